"""``PrivacyLedger``: what a private run spends and how it draws, shared by every training method.

It samples (Poisson logical batches, via the dataloader it builds), draws the noise, and accounts: one logical step
is released by ``release``, which adds N(0, sigma^2 C^2) to the coordinates this rank owns, divides by B = qN and
records the accounting event, together. The numbers the run is bound to (N, q, B, p, delta, sigma) are fixed once,
by ``bind_data``, in an immutable ``Binding``; the accountant's history and the budget only grow and tighten.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from torch.utils.data import DataLoader

from lightning_dpzero.accounting import (
    TAIL_CUTOFF,
    TAIL_SHARE,
    PrivacyAccountant,
    calibrate_noise_multiplier,
    tail_delta,
    tail_noise_multiplier,
)
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.noise import GaussianNoise, SecureGaussianNoise
from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.sampling.poisson import PoissonBatchSampler, check_replaceable, make_dp_dataloader
from lightning_dpzero.selfcheck import SelfCheck

__all__ = ["Binding", "PrivacyBudgetExhausted", "PrivacyLedger", "StepRelease"]


class PrivacyBudgetExhausted(RuntimeError):
    """Raised when asked to take a logical step that would spend more than the privacy budget."""


@dataclasses.dataclass(frozen=True)
class Binding:
    """The numbers a run is bound to when training starts; they never change during the run.

    Attributes:
        dataset_size: N, the number of training examples.
        sample_rate: q, each example's probability of being in a logical batch.
        physical_batch_size: p, the rows of a physical batch.
        delta: the delta of the (epsilon, delta) guarantee.
        noise_multiplier: sigma (the noise std is sigma C).
        calibrated_steps: the logical steps sigma was calibrated for (``target_epsilon`` only).
        calibrated_epsilon: the epsilon sigma was calibrated for.
    """

    dataset_size: int
    sample_rate: float
    physical_batch_size: int
    delta: float
    noise_multiplier: float
    calibrated_steps: int | None = None
    calibrated_epsilon: float | None = None

    @property
    def expected_batch_size(self) -> float:
        """B = qN, a real number: the normaliser of every step (never the realised, private, batch size)."""
        return self.sample_rate * self.dataset_size


class PrivacyLedger:
    """The sampler, the noise streams, the accountant and the budget of one private run.

    Args:
        config: the validated privacy settings.

    Privacy:
        After ``bind_data``: each ``release`` adds N(0, sigma^2 C^2) once to each coordinate it is handed (every
        coordinate of a logical step is handed to exactly one rank), divides by B = qN, and accounts one
        Poisson-sampled Gaussian event (q, sigma). ``may_step`` is False once the next step would take epsilon past
        the budget; ``release`` refuses such a step.
    """

    def __init__(self, config: PrivacyConfig) -> None:
        self.config = config
        self.binding: Binding | None = None
        self.accountant: PrivacyAccountant | None = None
        self.epsilon_limit: float | None = config.target_epsilon
        self.rank, self.world_size = 0, 1
        # 256 secret bits from the OS (or the user's seed), in memory only: every noise and sampling draw derives
        # from it, and nothing that would reproduce them is ever checkpointed (lightning_dpzero.randomness).
        self.key = SecretKey.from_seed(config.seed) if config.seed is not None else SecretKey.from_os()
        self.noise = self._make_noise(self.rank)
        self.sampler: PoissonBatchSampler | None = None
        self.self_check = SelfCheck(config.self_check_every)
        self.dataset: Any = None  # the training dataset and collate function, for the self-check to fetch rows
        self.collate: Callable[[list[Any]], Any] | None = None
        self._sample_position = 0  # the Poisson draw the next logical step uses (public counter, checkpointed)
        self._step_sample_rate: float | None = None  # the q the sampler drew this logical step's batch with
        self._restored: dict[str, Any] | None = None  # a checkpoint's ledger, checked against the data when bound

    # --------------------------------------------------------------------------------- what the run is bound to
    def _bound(self) -> Binding:
        if self.binding is None:
            raise RuntimeError("the privacy ledger is not bound to a dataset yet: bind_data() runs before a step")
        return self.binding

    @property
    def noise_multiplier(self) -> float | None:
        """sigma: bound, else what the config or the restored checkpoint fixes (``None``: calibrated when bound)."""
        if self.binding is not None:
            return self.binding.noise_multiplier
        if self._restored is not None and self._restored["noise_multiplier"] is not None:
            return float(self._restored["noise_multiplier"])
        return self.config.noise_multiplier

    @property
    def sample_rate(self) -> float | None:
        return None if self.binding is None else self.binding.sample_rate

    @property
    def expected_batch_size(self) -> float | None:
        return None if self.binding is None else self.binding.expected_batch_size

    @property
    def dataset_size(self) -> int | None:
        return None if self.binding is None else self.binding.dataset_size

    @property
    def calibrated_steps(self) -> int | None:
        if self.binding is not None:
            return self.binding.calibrated_steps
        return None if self._restored is None else self._restored["calibrated_steps"]

    @property
    def calibrated_epsilon(self) -> float | None:
        if self.binding is not None:
            return self.binding.calibrated_epsilon
        return None if self._restored is None else self._restored.get("calibrated_epsilon")

    @property
    def steps(self) -> int:
        """Logical steps accounted so far: the 0-based index of the next one."""
        return 0 if self.accountant is None else self.accountant.steps

    # ------------------------------------------------------------------------------------------------ set-up
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

    def bind_data(
        self,
        dataloader: DataLoader,
        *,
        planned_steps: Callable[[int], int | None],
        owner: str,
        method: str = "DP-SGD",
        clipping: str = "",
    ) -> DataLoader:
        """Replace ``dataloader``'s sampling by Poisson logical batches; fix N, q, B, p, delta and sigma.

        Args:
            dataloader: the user's training loader (its dataset, collate function and workers are kept).
            planned_steps: given the number of logical steps per epoch, the number of logical steps the run plans
                (``None`` if unbounded); sigma is calibrated for it when ``target_epsilon`` is set.
            owner: the class name used in error messages.
            method, clipping: what the run trains with and how it clips, for the start-of-run line.
        Raises:
            ValueError: custom samplers, delta >= 1/N, a budget that cannot be met, a changed dataset size or q.
        """
        check_replaceable(dataloader, owner)
        n = len(dataloader.dataset)  # type: ignore[arg-type]
        if n == 0:
            raise ValueError(f"{owner}: the training dataset is empty.")
        cfg = self.config
        if cfg.sample_rate is not None:
            q = cfg.sample_rate
        else:
            expected = cfg.expected_batch_size or dataloader.batch_size or 1
            if expected > n:
                raise ValueError(f"{owner}: expected_batch_size={expected} is larger than the dataset ({n} examples).")
            q = expected / n
        if self.binding is not None:  # a reloaded dataloader: the run stays bound to what it started with
            self._check_rebinding(n=n, q=q, owner=owner)
        else:
            self.binding = self._bind(n=n, q=q, dataloader=dataloader, planned_steps=planned_steps, owner=owner)
            if self.accountant is None:
                self.accountant = PrivacyAccountant(cfg.accountant, delta=self.binding.delta)
        binding = self.binding
        if self.sampler is None:
            self.sampler = PoissonBatchSampler(
                num_examples=n,
                sample_rate=q,
                physical_batch_size=binding.physical_batch_size,
                shapes=cfg.physical_batch_shapes,
                steps_per_epoch=max(1, round(1.0 / q)),
                key=self.key,
                rank=self.rank,
                world_size=self.world_size,
            )
        self.sampler.position = self._sample_position  # continue after the last draw a step used
        self.dataset, self.collate = dataloader.dataset, dataloader.collate_fn
        calibrated = (
            f" (calibrated for epsilon={binding.calibrated_epsilon} over {binding.calibrated_steps} steps)"
            if binding.calibrated_steps is not None
            else ""
        )
        rank_zero_info(
            f"{method}: N={n}, q={q:.4g}, B=qN={binding.expected_batch_size:.1f}, physical batch "
            f"p={binding.physical_batch_size}, sigma={binding.noise_multiplier:.4g}{calibrated}, "
            f"delta={binding.delta:.3g}, C={cfg.clip_norm}, {clipping}, {cfg.accountant.value} accountant"
        )
        return make_dp_dataloader(dataloader, self.sampler)

    def _bind(
        self,
        *,
        n: int,
        q: float,
        dataloader: DataLoader,
        planned_steps: Callable[[int], int | None],
        owner: str,
    ) -> Binding:
        cfg = self.config
        p = cfg.physical_batch_size or dataloader.batch_size or 1
        restored, self._restored = self._restored, None
        if restored is not None:
            self._check_restored(restored, q=q, n=n)
        delta = cfg.delta if cfg.delta is not None else n**-1.1
        if restored is not None and restored["accountant"] is not None:
            delta = restored["accountant"]["delta"]
        if delta >= 1.0 / n:
            raise ValueError(
                f"{owner}: delta={delta:.3g} is not below 1/N = {1.0 / n:.3g}; with delta >= 1/N a mechanism that "
                "publishes a random training example is (0, delta)-DP. Use delta < 1/N (the default is 1/N^1.1)."
            )
        planned = planned_steps(max(1, round(1.0 / q)))
        sigma: float | None = cfg.noise_multiplier
        calibrated_steps: int | None = None
        calibrated_epsilon: float | None = None
        if restored is not None:
            sigma = restored["noise_multiplier"]
            calibrated_steps, calibrated_epsilon = restored["calibrated_steps"], restored.get("calibrated_epsilon")
        if sigma is None:
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
            sigma = calibrate_noise_multiplier(
                target_epsilon=cfg.target_epsilon, delta=delta, sample_rate=q, steps=planned, accountant=cfg.accountant
            )
            calibrated_steps, calibrated_epsilon = planned, cfg.target_epsilon
        elif calibrated_steps is not None and (planned is None or planned > calibrated_steps):
            rank_zero_warn(
                f"{owner}: sigma was calibrated for {calibrated_steps} logical steps (target_epsilon="
                f"{calibrated_epsilon}); this run plans {planned or 'unbounded'} steps, so it will stop when one "
                "more step would exceed the budget."
            )
        steps = planned if planned is not None else calibrated_steps
        if sigma > 0 and steps is not None:
            self._check_tail(sigma=float(sigma), q=q, steps=steps, delta=delta, owner=owner)
        return Binding(
            dataset_size=n,
            sample_rate=q,
            physical_batch_size=p,
            delta=delta,
            noise_multiplier=float(sigma),
            calibrated_steps=calibrated_steps,
            calibrated_epsilon=calibrated_epsilon,
        )

    @staticmethod
    def _check_tail(*, sigma: float, q: float, steps: int, delta: float, owner: str) -> None:
        """Refuse a sigma so small that the noise's tail cutoff could add more than ``TAIL_SHARE`` of delta over
        ``steps`` steps (``accounting.tail_delta``), which the accountant does not count."""
        extra = tail_delta(noise_multiplier=sigma, sample_rate=q, steps=steps)
        if extra > TAIL_SHARE * delta:
            needed = tail_noise_multiplier(sample_rate=q, steps=steps, delta=delta)
            fix = f"use noise_multiplier >= {needed:.3g}" if math.isfinite(needed) else "no noise_multiplier is enough"
            raise ValueError(
                f"{owner}: noise_multiplier={sigma:.4g} is too small for the noise sampler, whose tail stops at "
                f"{TAIL_CUTOFF:.2f} standard deviations: over {steps} steps at q={q:.4g} the cutoff could add up to "
                f"{extra:.3g} to delta={delta:.3g}, more than {TAIL_SHARE:.0%} of it, and the accountant does not "
                f"count it. For these steps and q, {fix} (a lower target_epsilon), or train fewer steps or at a "
                "lower sample rate."
            )

    def _check_rebinding(self, *, n: int, q: float, owner: str) -> None:
        binding = self._bound()
        if n != binding.dataset_size:
            raise ValueError(
                f"{owner}: the training dataset changed size ({binding.dataset_size} -> {n}); epsilon is accounted "
                "for one dataset. Start a new run for a new dataset."
            )
        if not math.isclose(q, binding.sample_rate, rel_tol=1e-12):
            # A reloaded dataloader (reload_dataloaders_every_n_epochs) with another batch_size: the sampler and the
            # accountant must keep agreeing on one q, so the change is refused rather than half applied.
            raise ValueError(
                f"{owner}: the training DataLoader now gives q={q:.6g} (B = qN = {q * n:.1f}), but this run samples "
                f"with q={binding.sample_rate:.6g} (B = {binding.expected_batch_size:.1f}); q is fixed when training "
                "starts and every step is accounted with it. Keep the DataLoader's batch_size, or fix B with "
                "PrivacyConfig(expected_batch_size=...)."
            )

    # ------------------------------------------------------------------------------------------------ a step
    def use_sample(self, sample_index: int, sample_rate: float | None) -> None:
        """Record that the logical step about to run trains on Poisson draw ``sample_index``, drawn with q =
        ``sample_rate``; the accountant records exactly that q (checked against the run's q)."""
        if sample_rate is not None and (self.binding is None or sample_rate != self.binding.sample_rate):
            raise RuntimeError(
                f"the logical batch was sampled with q={sample_rate}, but the accountant would record "
                f"q={self.sample_rate}; refusing a step whose accounting would not match its sampling."
            )
        if sample_index < self._sample_position:
            # The same Poisson sample released twice would be two Gaussian releases of one subsample, which the
            # accountant (fresh samples each step) would undercount.
            raise RuntimeError(
                f"Poisson draw {sample_index} was already used by a logical step (the next unused draw is "
                f"{self._sample_position}): the training step ran twice on one logical batch, e.g. an optimizer "
                "that evaluates its closure several times per step (LBFGS). Each logical batch is released once "
                "under DP: use an optimizer that evaluates the closure once (SGD, Adam, AdamW, ...)."
            )
        self._step_sample_rate = sample_rate
        self._sample_position = sample_index + 1

    def may_step(self) -> bool:
        """Whether one more logical step keeps epsilon within the budget (always True without a budget), and the
        noise's tail cutoff within ``TAIL_SHARE`` of delta (checked at binding for a run that plans its steps)."""
        if self._tail_exhausted():
            return False
        if self.epsilon_limit is None or self.accountant is None or self.binding is None:
            return True
        binding = self.binding
        if (
            binding.calibrated_steps is not None
            and binding.calibrated_epsilon is not None
            and self.accountant.steps < binding.calibrated_steps
            and self.epsilon_limit >= binding.calibrated_epsilon
        ):
            # sigma was calibrated so that epsilon(calibrated_steps) <= calibrated_epsilon, and epsilon grows with
            # the steps. Only while the limit in force is no tighter than that target: a resumed run or a
            # PrivacyBudget may have lowered it, and a resumed run may plan more steps than sigma was calibrated for.
            return True
        return (
            self.accountant.epsilon_after_next(
                noise_multiplier=binding.noise_multiplier, sample_rate=binding.sample_rate
            )
            <= self.epsilon_limit
        )

    def _tail_exhausted(self) -> bool:
        """Whether one more step would let the noise's tail cutoff add more than ``TAIL_SHARE`` of delta."""
        if self.binding is None or self.accountant is None or self.binding.noise_multiplier <= 0:
            return False
        binding = self.binding
        extra = tail_delta(
            noise_multiplier=binding.noise_multiplier, sample_rate=binding.sample_rate, steps=self.accountant.steps + 1
        )
        return extra > TAIL_SHARE * binding.delta

    def stop_reason(self) -> str | None:
        """Why one more logical step may not run (the tail cutoff's share of delta, or epsilon's budget), or None."""
        if self.accountant is None or self.binding is None:
            return None
        if self._tail_exhausted():
            return (
                f"one more step would let the noise's tail cutoff ({TAIL_CUTOFF:.2f} standard deviations) add more "
                f"than {TAIL_SHARE:.0%} of delta={self.binding.delta:.3g} at noise_multiplier="
                f"{self.binding.noise_multiplier:.4g} (after {self.accountant.steps} steps); a larger noise_multiplier "
                "allows more steps (accounting.tail_noise_multiplier)."
            )
        if not self.may_step():
            return (
                f"one more step would take epsilon past the budget of {self.epsilon_limit} "
                f"(epsilon now {self.epsilon():.4g} after {self.accountant.steps} steps)."
            )
        return None

    def refuse_past_budget(self) -> None:
        """Raise ``PrivacyBudgetExhausted`` when one more step would take epsilon past the budget (or let the noise's
        tail cutoff take more than its share of delta)."""
        if self.accountant is None or self.binding is None:
            raise RuntimeError("the privacy ledger is not bound to a dataset yet: bind_data() runs before a step")
        reason = self.stop_reason()
        if reason is not None:
            raise PrivacyBudgetExhausted(reason)

    def release(self, owned: Iterable[Tensor], *, scale: float = 1.0) -> None:
        """Release one logical step: in place, each tensor <- (scale * t + N(0, sigma^2 C^2)) / B, then account it.

        Args:
            owned: the coordinates of the step's summed clipped values that this rank owns (each coordinate of the
                step is handed to exactly one rank's ``release``); may be empty.
            scale: undoes an engine's averaging over the ranks (DeepSpeed hands the mean of W sums: ``scale=W``).
        Privacy:
            Noise, normalisation and the accounting event happen together, in this order, once per logical step;
            the step is refused first if it would take epsilon past the budget.
        """
        release = self.begin_release()
        release.add(owned, scale=scale)
        release.close()

    def begin_release(self) -> StepRelease:
        """A release in pieces, for engines that hand this rank's coordinates over in several calls (DeepSpeed
        ZeRO-3 steps its optimizer once per sub-group): ``add`` each piece, ``close`` once (the accounting event)."""
        return StepRelease(self)

    def _add_noise(self, values: Tensor, std: float) -> None:
        values += self.noise.sample(values.shape, std=std, device=values.device).to(values.dtype)

    def _account_step(self) -> None:
        """Record one logical step with the accountant: the q its batch was sampled with (``use_sample``)."""
        binding = self._bound()
        assert self.accountant is not None  # created with the binding
        q = self._step_sample_rate if self._step_sample_rate is not None else binding.sample_rate
        assert q == binding.sample_rate, f"the step was sampled with q={q}, the run accounts q={binding.sample_rate}"
        self.accountant.step(noise_multiplier=binding.noise_multiplier, sample_rate=q)
        self._step_sample_rate = None

    def epsilon(self) -> float:
        """Epsilon after the logical steps taken (0 before the first)."""
        return 0.0 if self.accountant is None else self.accountant.epsilon()

    @property
    def delta(self) -> float | None:
        return None if self.accountant is None else self.accountant.delta

    def tighten_budget(self, max_epsilon: float) -> None:
        """Lower the epsilon limit to ``max_epsilon`` if that is tighter (``PrivacyBudget``); never raises it."""
        self.epsilon_limit = max_epsilon if self.epsilon_limit is None else min(self.epsilon_limit, max_epsilon)

    # ------------------------------------------------------------------------------------------------- state
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
        if self.binding is not None:
            # Restored into a bound run (a checkpoint loaded after the dataloader): bind again from the checkpoint.
            binding = self.binding
            self._check_restored(state, q=binding.sample_rate, n=binding.dataset_size)
            self.binding = dataclasses.replace(
                binding,
                noise_multiplier=float(state["noise_multiplier"]),
                calibrated_steps=state["calibrated_steps"],
                calibrated_epsilon=state.get("calibrated_epsilon"),
            )
        else:
            self._restored = state
        stored_limit = state.get("epsilon_limit")
        if stored_limit is not None:  # the tightest budget in force: the checkpointed run's and this run's
            self.tighten_budget(stored_limit)
        if state["accountant"] is not None:
            self.accountant = PrivacyAccountant(cfg.accountant, delta=state["accountant"]["delta"])
            self.accountant.load_state_dict(state["accountant"])
        self._sample_position = int(state.get("sample_position", 0))
        if self.sampler is not None:
            self.sampler.position = self._sample_position

    @staticmethod
    def _check_restored(state: dict[str, Any], *, q: float, n: int) -> None:
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


class StepRelease:
    """One logical step being released: noise and division by B on every piece handed to ``add``, then one
    accounting event at ``close``. Created by ``PrivacyLedger.begin_release``, which refuses a step past the budget
    before anything is released.
    """

    def __init__(self, ledger: PrivacyLedger) -> None:
        ledger.refuse_past_budget()
        self._ledger = ledger
        binding = ledger._bound()
        self._std = binding.noise_multiplier * ledger.config.clip_norm
        self._normaliser = binding.expected_batch_size
        self.closed = False
        ledger.noise.start_step(ledger.steps)  # this step's noise streams, whoever draws them and when

    def add(self, owned: Iterable[Tensor], *, scale: float = 1.0) -> None:
        """In place, each tensor <- (scale * t + N(0, sigma^2 C^2)) / B (coordinates this rank owns, once each)."""
        if self.closed:
            raise RuntimeError("this logical step was released and accounted already; a new step needs a new release")
        for values in owned:
            if scale != 1.0:
                values *= scale
            self._ledger._add_noise(values, self._std)
            # Divide by the expected B = qN, never the realised batch size: that one is private.
            values /= self._normaliser

    def close(self) -> None:
        """Record the step's accounting event (once)."""
        if not self.closed:
            self.closed = True
            self._ledger._account_step()
