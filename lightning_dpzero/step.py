"""``DPStep``: one logical DP-SGD step (docs/design.md), shared by every strategy.

sample (Poisson, via the dataloader it builds) -> clip (per physical batch, ``ClippingEngine``) -> sum ->
noise N(0, sigma^2 C^2) once per coordinate -> divide by the expected batch size B = qN -> account.
Strategies only decide where the clipped sums are reduced and which coordinates a rank adds noise to.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from lightning_dpzero.accounting import PrivacyAccountant, calibrate_noise_multiplier
from lightning_dpzero.clipping.engine import REENTRANT_CHECKPOINT, ClippingEngine
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.loss import summed_loss, training_step_loss
from lightning_dpzero.noise import GaussianNoise, SecureGaussianNoise
from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.sampling.poisson import PoissonBatchSampler, check_replaceable, make_dp_dataloader
from lightning_dpzero.selfcheck import SelfCheck

__all__ = ["DPStep", "PrivacyBudgetExhausted"]


def _shard_bounds(size: int, rank: int, world_size: int) -> tuple[int, int]:
    """[lo, hi) of the rank-th of ``world_size`` contiguous, near-equal pieces of range(size)."""
    per, extra = divmod(size, world_size)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (1 if rank < extra else 0)


class PrivacyBudgetExhausted(RuntimeError):
    """Raised when asked to take a logical step that would spend more than the privacy budget."""


class DPStep:
    """The DP-SGD step for one LightningModule, with its sampler, noise stream and accountant.

    Args:
        config: the validated privacy settings.

    Privacy:
        After ``bind_data``: every logical step adds N(0, sigma^2 C^2) to each coordinate of the summed clipped
        gradient exactly once, divides by B = qN, and is accounted as one Poisson-sampled Gaussian event (q, sigma).
        ``may_step`` is False once the next step would take epsilon past the budget; strategies refuse it.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.engine: ClippingEngine | None = None
        self.noise_multiplier: float | None = config.noise_multiplier
        self.dataset_size: int | None = None
        self.sample_rate: float | None = None
        self.expected_batch_size: float | None = None  # qN, a real number: the normaliser
        self.physical_batch_size: int | None = None
        self.calibrated_steps: int | None = None  # the steps sigma was calibrated for (target_epsilon only)
        self.epsilon_limit: float | None = config.target_epsilon
        self.accountant: PrivacyAccountant | None = None
        self.calibrated_epsilon: float | None = None  # the target sigma was calibrated for
        self.rank, self.world_size = 0, 1
        # 256 secret bits from the OS (or the user's seed), in memory only: every noise and sampling draw derives
        # from it, and nothing that would reproduce them is ever checkpointed (lightning_dpzero.randomness).
        self.key = SecretKey.from_seed(config.seed) if config.seed is not None else SecretKey.from_os()
        self.noise = self._make_noise(self.rank)
        self.sampler: PoissonBatchSampler | None = None
        self._sample_position = 0  # the Poisson draw the next logical step uses (public counter, checkpointed)
        self._step_sample_rate: float | None = None  # the q the sampler drew this logical step's batch with
        self._restored: dict[str, Any] | None = None
        self._checked_coverage = False
        self.self_check = SelfCheck(config.self_check_every)
        self.dataset: Any = None  # the training dataset and collate function, for the self-check to fetch rows
        self.collate: Callable[[list[Any]], Any] | None = None

    # --------------------------------------------------------------------------------------------- set-up
    def set_rank(self, rank: int, world_size: int, key: bytes | None = None) -> None:
        """Use rank-specific streams; ``key`` (rank 0's, shared in memory) must be the same on every rank."""
        self.rank, self.world_size = rank, world_size
        if key is not None:
            self.key = SecretKey(key, seeded=self.key.seeded)
        self.noise = self._make_noise(rank)

    def _make_noise(self, rank: int) -> GaussianNoise | SecureGaussianNoise:
        if self.config.secure_rng:
            return SecureGaussianNoise()
        return GaussianNoise(self.key, rank)

    def attach(self, model: nn.Module) -> None:
        """Validate ``model`` (every trainable layer has a clipping rule) and hook it."""
        if self.engine is None:
            self.engine = ClippingEngine(model, self.config)
        self.engine.attach()

    def detach(self) -> None:
        if self.engine is not None:
            self.engine.detach()

    def bind_data(
        self, dataloader: DataLoader, *, planned_steps: Callable[[int], int | None], owner: str = "DPStep"
    ) -> DataLoader:
        """Replace ``dataloader``'s sampling by Poisson logical batches; fix q, B, p, delta and sigma.

        Args:
            dataloader: the user's training loader (its dataset, collate function and workers are kept).
            planned_steps: given the number of logical steps per epoch, the number of logical steps the run plans
                (``None`` if unbounded); sigma is calibrated for it when ``target_epsilon`` is set.
            owner: the class name used in error messages.
        Raises:
            ValueError: custom samplers, delta >= 1/N, a budget that cannot be met, a changed dataset size.
        """
        check_replaceable(dataloader, owner)
        n = len(dataloader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"{owner}: the training dataset is empty.")
        if self.dataset_size is not None and n != self.dataset_size:
            raise ValueError(
                f"{owner}: the training dataset changed size ({self.dataset_size} -> {n}); epsilon is accounted "
                "for one dataset. Start a new run for a new dataset."
            )
        cfg = self.config
        if cfg.sample_rate is not None:
            q = cfg.sample_rate
        else:
            expected = cfg.expected_batch_size or dataloader.batch_size or 1
            if expected > n:
                raise ValueError(f"{owner}: expected_batch_size={expected} is larger than the dataset ({n} examples).")
            q = expected / n
        if self.sample_rate is not None and not math.isclose(q, self.sample_rate, rel_tol=1e-12):
            # A reloaded dataloader (reload_dataloaders_every_n_epochs) with another batch_size: the sampler and the
            # accountant must keep agreeing on one q, so the change is refused rather than half applied.
            raise ValueError(
                f"{owner}: the training DataLoader now gives q={q:.6g} (B = qN = {q * n:.1f}), but this run samples "
                f"with q={self.sample_rate:.6g} (B = {self.sample_rate * n:.1f}); q is fixed when training starts "
                "and every step is accounted with it. Keep the DataLoader's batch_size, or fix B with "
                "PrivacyConfig(expected_batch_size=...)."
            )
        p = self.physical_batch_size or cfg.physical_batch_size or dataloader.batch_size or 1
        delta = cfg.delta if cfg.delta is not None else n**-1.1
        if delta >= 1.0 / n:
            raise ValueError(
                f"{owner}: delta={delta:.3g} is not below 1/N = {1.0 / n:.3g}; with delta >= 1/N a mechanism that "
                "publishes a random training example is (0, delta)-DP. Use delta < 1/N (the default is 1/N^1.1)."
            )
        steps_per_epoch = max(1, round(1.0 / q))
        planned = planned_steps(steps_per_epoch)
        if self._restored is not None:
            self._check_restored(q=q, n=n)
        if self.noise_multiplier is None:
            if planned is None:
                raise ValueError(
                    f"{owner}: cannot calibrate sigma for target_epsilon={cfg.target_epsilon} when training is "
                    "unbounded; set Trainer(max_steps=...) or max_epochs, or give PrivacyConfig(noise_multiplier=...)."
                )
            if cfg.target_epsilon is None:  # e.g. resumed from a checkpoint of a run that had not calibrated sigma
                raise ValueError(
                    f"{owner}: there is no noise_multiplier and no target_epsilon to calibrate one for; set exactly "
                    "one of them in PrivacyConfig."
                )
            self.noise_multiplier = calibrate_noise_multiplier(
                target_epsilon=cfg.target_epsilon, delta=delta, sample_rate=q, steps=planned, accountant=cfg.accountant
            )
            self.calibrated_steps, self.calibrated_epsilon = planned, cfg.target_epsilon
        elif self.calibrated_steps is not None and (planned is None or planned > self.calibrated_steps):
            rank_zero_warn(
                f"{owner}: sigma was calibrated for {self.calibrated_steps} logical steps (target_epsilon="
                f"{self.calibrated_epsilon}); this run plans {planned or 'unbounded'} steps, so it will stop when one "
                "more step would exceed the budget."
            )
        self.dataset_size, self.sample_rate, self.physical_batch_size = n, q, p
        self.expected_batch_size = q * n
        if self.accountant is None:
            self.accountant = PrivacyAccountant(cfg.accountant, delta=delta)
        if self.sampler is None:
            self.sampler = PoissonBatchSampler(
                num_examples=n,
                sample_rate=q,
                physical_batch_size=p,
                shapes=cfg.physical_batch_shapes,
                steps_per_epoch=steps_per_epoch,
                key=self.key,
                rank=self.rank,
                world_size=self.world_size,
            )
        self.sampler.position = self._sample_position  # continue after the last draw a step used
        self.dataset, self.collate = dataloader.dataset, dataloader.collate_fn
        rank_zero_info(
            f"{self.method_name}: N={n}, q={q:.4g}, B=qN={q * n:.1f}, physical batch p={p}, "
            f"sigma={self.noise_multiplier:.4g}"
            + (
                f" (calibrated for epsilon={self.calibrated_epsilon} over {self.calibrated_steps} steps)"
                if self.calibrated_steps is not None
                else ""
            )
            + f", delta={delta:.3g}, C={cfg.clip_norm}, {self.clipping_description}, {cfg.accountant.value} accountant"
        )
        return make_dp_dataloader(dataloader, self.sampler)

    @property
    def method_name(self) -> str:
        """What this step runs, for messages."""
        return "DP-SGD"

    @property
    def clipping_description(self) -> str:
        cfg = self.config
        return f"{cfg.clipping_style.value} {cfg.clipping_function} clipping"

    def use_sample(self, sample_index: int, sample_rate: float | None) -> None:
        """Record that the logical step about to run trains on Poisson draw ``sample_index``, drawn with q =
        ``sample_rate``; the accountant records exactly that q (checked against the run's q)."""
        if sample_rate is not None and (self.sample_rate is None or sample_rate != self.sample_rate):
            raise RuntimeError(
                f"the logical batch was sampled with q={sample_rate}, but the accountant would record "
                f"q={self.sample_rate}; refusing a step whose accounting would not match its sampling."
            )
        self._step_sample_rate = sample_rate
        self._sample_position = sample_index + 1

    # ------------------------------------------------------------------------------------------ the step
    def may_step(self) -> bool:
        """Whether one more logical step keeps epsilon within the budget (always True without a budget)."""
        if self.epsilon_limit is None or self.accountant is None:
            return True
        assert self.noise_multiplier is not None and self.sample_rate is not None
        if (
            self.calibrated_steps is not None
            and self.calibrated_epsilon is not None
            and self.accountant.steps < self.calibrated_steps
            and self.epsilon_limit >= self.calibrated_epsilon
        ):
            # sigma was calibrated so that epsilon(calibrated_steps) <= calibrated_epsilon, and epsilon grows with
            # the steps. Only while the limit in force is no tighter than that target: a resumed run or a
            # PrivacyBudget may have lowered it, and a resumed run may plan more steps than sigma was calibrated for.
            return True
        return (
            self.accountant.epsilon_after_next(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
            <= self.epsilon_limit
        )

    def physical_batch(self, forward: Callable[[], Any], mask: Tensor, device: torch.device) -> tuple[Any, Tensor]:
        """Run one physical batch: ``forward()`` (the user's training_step) recorded by the engine, then ``backward``.

        Returns:
            ``training_step``'s output and the detached mean loss over the real examples (for logging only).
        """
        assert self.engine is not None, "DPStep.attach() was not called"
        with self.engine.recording(device, rows=mask.numel()):
            output = forward()
        return output, self.backward(output, mask)

    @property
    def probe_engine(self) -> ClippingEngine | None:
        """The engine the per-example self-check probes (``None``: it compares losses and buffers only)."""
        return self.engine

    def backward(self, output: Any, mask: Tensor) -> Tensor:
        """Clip and add one physical batch, from the output of ``training_step`` (recorded by the engine).

        The loss may be per-example losses of shape [p] (preferred: returned as the loss, or as
        ``{"loss": losses.mean(), "per_example_loss": losses}`` so the same module also trains without DP), or a
        scalar mean over the p rows of the physical batch, every row weighted equally (it is multiplied by p to
        recover the sum of per-example losses). Token-level language-model losses must therefore average over
        the same number of tokens in every row, or be returned per example.

        Returns:
            The detached mean loss over the real examples (for logging only).
        """
        assert self.engine is not None, "DPStep.attach() was not called"
        loss = training_step_loss(output)
        total = summed_loss(loss, mask.numel())
        if loss.dim() == 0:
            shown = loss.detach()
        else:
            real = mask.to(loss.device, loss.dtype)
            shown = (loss.detach() * real).sum() / real.sum().clamp(min=1)
        self.engine.backward(total, mask)
        return shown

    def finish_step(
        self,
        optimizer: Optimizer | None,
        named_params: Callable[[], Iterable[tuple[str, nn.Parameter]]],
        *,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> None:
        """End the logical step on a strategy whose parameters are whole on every rank: ``privatize`` the
        parameters ``named_params()`` lists (``all_reduce`` sums the clipped sums over the ranks)."""
        self.privatize(named_params(), all_reduce=all_reduce)

    def privatize(
        self,
        named_params: Iterable[tuple[str, nn.Parameter]],
        *,
        all_reduce: Callable[[Tensor], None] | None = None,
    ) -> None:
        """Write (sum of clipped gradients + noise) / B into ``p.grad`` and account the step.

        Args:
            named_params: the parameters the optimizer updates, with their canonical names (same order on every
                rank).
            all_reduce: data parallel only: sums a flat fp32 tensor over the ranks, in place. The clipped sums of
                all parameters travel in one flat buffer, the same bytes as one data-parallel gradient reduction.
        Privacy:
            Noise N(0, sigma^2 C^2) is drawn once per coordinate per logical step, whatever the number of physical
            batches. With W ranks, rank r draws the noise of the r-th contiguous 1/W of the flat gradient before
            the sum, so every coordinate gets exactly one draw, from the stream of the rank that owns it.
        """
        named_params = list(named_params)
        summed = self.begin_step([name for name, _ in named_params])
        if named_params:
            device = named_params[0][1].device
            flat = torch.cat(
                [
                    summed[name].flatten() if name in summed else torch.zeros(p.numel(), device=device)
                    for name, p in named_params
                ]
            )
            lo, hi = _shard_bounds(flat.numel(), self.rank, self.world_size)
            self._add_noise(flat[lo:hi])
            if all_reduce is not None:
                all_reduce(flat)
            # Divide by the expected B = qN, never the realised batch size: that one is private.
            assert self.expected_batch_size is not None  # set by bind_data, with the accountant begin_step checked
            flat /= self.expected_batch_size
            offset = 0
            for _, param in named_params:
                param.grad = flat[offset : offset + param.numel()].view_as(param).to(param.dtype)
                offset += param.numel()
        self.account_step()

    def begin_step(self, names: list[str]) -> dict[str, Tensor]:
        """Refuse a step past the budget; return (and reset) the clipped sums of the logical step."""
        assert self.engine is not None and self.accountant is not None, "bind_data() must run before a step"
        if not self.may_step():
            raise PrivacyBudgetExhausted(
                f"one more step would take epsilon past the budget of {self.epsilon_limit} "
                f"(epsilon now {self.epsilon():.4g} after {self.accountant.steps} steps)."
            )
        self._check_coverage(names)
        self.noise.start_step(self.accountant.steps)  # this step's noise streams, whoever draws them and when
        return self.engine.pop_summed()

    def _add_noise(self, values: Tensor) -> None:
        assert self.noise_multiplier is not None
        std = self.noise_multiplier * self.config.clip_norm
        values += self.noise.sample(values.shape, std=std, device=values.device).to(values.dtype)

    def add_noise_and_normalise(self, grad: Tensor, *, scale: float = 1.0) -> None:
        """In place: grad <- (scale * grad + N(0, sigma^2 C^2)) / B, for coordinates this rank owns.

        Sharded engines call it on the rank's own gradient partition; ``scale`` undoes the engine's averaging over
        the ranks (W), so that the result is (sum of clipped gradients + noise) / B.
        """
        assert self.expected_batch_size is not None
        if scale != 1.0:
            grad *= scale
        self._add_noise(grad)
        grad /= self.expected_batch_size

    def account_step(self) -> None:
        """Record one logical step with the accountant: the q its batch was sampled with (``use_sample``)."""
        assert self.accountant is not None and self.noise_multiplier is not None and self.sample_rate is not None
        q = self._step_sample_rate if self._step_sample_rate is not None else self.sample_rate
        assert q == self.sample_rate, f"the step was sampled with q={q}, the run accounts q={self.sample_rate}"
        self.accountant.step(noise_multiplier=self.noise_multiplier, sample_rate=q)
        self._step_sample_rate = None

    def _check_coverage(self, names: list[str]) -> None:
        if self._checked_coverage:
            return
        assert self.engine is not None
        missing = [name for name in names if name not in self.engine.seen]
        ungraded = [name for name in missing if self.engine.owner[name] in self.engine.ungraded]
        if ungraded:
            raise RuntimeError(
                f"trainable parameter(s) {ungraded[:5]} received no per-example gradient in the first logical step: "
                f"their module(s) {sorted({self.engine.owner[n] for n in ungraded})[:5]} ran with gradients "
                "disabled (torch.no_grad, or the forward of reentrant activation checkpointing). Freeze what is "
                f"computed without gradients (requires_grad_(False)); for checkpointing: {REENTRANT_CHECKPOINT}."
            )
        if missing:
            raise RuntimeError(
                f"trainable parameter(s) {missing[:5]} received no per-example gradient in the first logical step: "
                "either they are unused (freeze them with requires_grad_(False)) or they are used outside their "
                "module (e.g. F.linear(x, self.fc.weight)); call the module instead, so its gradient is clipped."
            )
        self._checked_coverage = True

    def epsilon(self) -> float:
        """Epsilon after the logical steps taken (0 before the first)."""
        return 0.0 if self.accountant is None else self.accountant.epsilon()

    @property
    def delta(self) -> float | None:
        return None if self.accountant is None else self.accountant.delta

    # -------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The run's public ledger: what a resumed run needs to continue the accounting, and nothing secret.

        Privacy:
            No key, seed or generator state: a resumed run draws from a new OS key (or rebuilds the user's seeded
            key); the counters (steps accounted, Poisson draws used) are not secret.
        """
        return {
            "noise_multiplier": self.noise_multiplier,
            "sample_rate": self.sample_rate,
            "clip_norm": self.config.clip_norm,
            "dataset_size": self.dataset_size,
            "calibrated_steps": self.calibrated_steps,
            "calibrated_epsilon": self.calibrated_epsilon,
            "epsilon_limit": self.epsilon_limit,
            "accountant": None if self.accountant is None else self.accountant.state_dict(),
            "sample_position": self._sample_position,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a checkpointed run: its accountant history and sigma continue, and its budget can only tighten."""
        cfg = self.config
        if not math.isclose(state["clip_norm"], cfg.clip_norm):
            raise ValueError(
                f"the checkpoint was trained with clip_norm={state['clip_norm']}, the config says {cfg.clip_norm}; "
                "changing C on resume invalidates the accounting. Resume with the same PrivacyConfig."
            )
        if (
            cfg.noise_multiplier is not None
            and state["noise_multiplier"] is not None
            and not math.isclose(state["noise_multiplier"], cfg.noise_multiplier)
        ):
            raise ValueError(
                f"the checkpoint was trained with noise_multiplier={state['noise_multiplier']}, the config says "
                f"{cfg.noise_multiplier}; resume with the same PrivacyConfig."
            )
        self.noise_multiplier = state["noise_multiplier"]
        self.calibrated_steps = state["calibrated_steps"]
        self.calibrated_epsilon = state.get("calibrated_epsilon")
        stored_limit = state.get("epsilon_limit")
        if stored_limit is not None:  # the tightest budget in force: the checkpointed run's and this run's
            self.epsilon_limit = stored_limit if self.epsilon_limit is None else min(self.epsilon_limit, stored_limit)
        if state["accountant"] is not None:
            self.accountant = PrivacyAccountant(cfg.accountant, delta=state["accountant"]["delta"])
            self.accountant.load_state_dict(state["accountant"])
        self._sample_position = int(state.get("sample_position", 0))
        if self.sampler is not None:
            self.sampler.position = self._sample_position
        self._restored = state

    def tighten_budget(self, max_epsilon: float) -> None:
        """Lower the epsilon limit to ``max_epsilon`` if that is tighter (``PrivacyBudget``); never raises it."""
        self.epsilon_limit = max_epsilon if self.epsilon_limit is None else min(self.epsilon_limit, max_epsilon)

    def _check_restored(self, *, q: float, n: int) -> None:
        state = self._restored
        assert state is not None
        if state["dataset_size"] is not None and state["dataset_size"] != n:
            raise ValueError(
                f"the checkpoint was trained on {state['dataset_size']} examples, this run has {n}; epsilon is "
                "accounted for one dataset."
            )
        if state["sample_rate"] is not None and not math.isclose(state["sample_rate"], q):
            raise ValueError(
                f"the checkpoint was trained with sample rate q={state['sample_rate']:.6g}, this run has q={q:.6g}; "
                "resume with the same expected batch size."
            )
        self._restored = None
