"""``ZOStep``: one logical zeroth-order DP step (docs/design.md), released through the same ``PrivacyLedger``.

Notation: P directions z_1..z_P ~ N(0, I) over the trainable (kept) coordinates, regenerated from a public seed;
beta, eta, lambda of the current stage; C the clip norm, sigma the noise multiplier, B = qN.

Per logical step t:
1. for each physical batch and each direction j: per-example losses at theta + beta z_j and theta - beta z_j
   (forward passes only, dropout off), d_ij = (l_i(theta + beta z_j) - l_i(theta - beta z_j)) / (2 beta);
2. each real example's vector d_i = (d_i1..d_iP) is clipped jointly to norm C (``clipping_function``), padded rows
   contribute exactly 0, and the clipped vectors are summed over physical batches (and ranks);
3. N(0, sigma^2 C^2 I_P) is added once, and the sum divided by B: g = (sum + noise) / B, P numbers;
4. theta <- theta - eta ((1/P) sum_j g_j z_j + lambda (theta - theta_s)), in place, block by block;
5. one Poisson-sampled Gaussian event (q, sigma) is accounted, exactly as first-order DP-SGD.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor, nn
from torch.optim import Optimizer

from lightning_dpzero._internals import deepspeed as ds_internals
from lightning_dpzero._internals import torch as torch_internals
from lightning_dpzero.clipping.functions import _FUNCTIONS
from lightning_dpzero.config import NonFinitePolicy, PrivacyConfig
from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.loss import training_step_loss
from lightning_dpzero.method import Reducer
from lightning_dpzero.randomness import SecretKey
from lightning_dpzero.selfcheck import eval_mode
from lightning_dpzero.zeroth_order.perturbation import BLOCK, DirectionSampler, Perturber, _flat
from lightning_dpzero.zeroth_order.pruning import select_coordinates, synflow_scores
from lightning_dpzero.zeroth_order.schedule import StageSchedule

__all__ = ["ZOStep", "public_direction_seed"]


def public_direction_seed(key: SecretKey) -> int:
    """The run's public direction seed: 64 bits of a one-way hash of the secret key.

    Privacy:
        z is public (it does not depend on the data), and its seed may be published; SHA-256 makes sure that
        publishing it reveals nothing about the key, from which the noise and sampling streams derive.
    """
    return int.from_bytes(key.derive("zo-directions")[:8], "big")


def per_example_losses(output: Any, physical_batch_size: int) -> Tensor:
    """The per-example losses [p] in ``training_step``'s output (a tensor, or a dict with ``per_example_loss``)."""
    loss = training_step_loss(output)
    if loss.shape != (physical_batch_size,):
        raise ValueError(
            f"zeroth-order DP needs per-example losses of shape [{physical_batch_size}] from training_step, got "
            f"shape {tuple(loss.shape)}: a mean over the batch cannot be split into per-example differences. Return "
            "{'loss': losses.mean(), 'per_example_loss': losses} (losses of shape [p])."
        )
    return loss


class ZOStep:
    """The zeroth-order DP step for one LightningModule, a peer of ``DPStep`` with its own ``PrivacyLedger``.

    Args:
        config: the validated privacy settings, with ``method="zeroth_order"``.

    Privacy:
        Each example's P finite differences are clipped jointly to norm C and padded rows contribute 0, so the
        per-step sum has L2 sensitivity C (add/remove one example); N(0, sigma^2 C^2 I_P) is added once per logical
        step, and the step is accounted as one Poisson-sampled Gaussian event (q, sigma), exactly as DP-SGD. The
        directions z, the schedule and the pruning mask do not depend on the data (post-processing).
    """

    def __init__(self, config: PrivacyConfig) -> None:
        if config.zeroth_order is None:
            raise ValueError(
                "ZOStep: the PrivacyConfig has method='first_order'; use DPStep, or method='zeroth_order'."
            )
        self.config = config
        self.ledger = PrivacyLedger(config)
        self.zo = config.zeroth_order
        self.schedule = StageSchedule(self.zo)
        self.directions = DirectionSampler(public_direction_seed(self.ledger.key))
        self.model: nn.Module | None = None
        self.params: dict[str, nn.Parameter] = {}  # canonical name -> trainable parameter with kept coordinates
        self.kept: dict[str, Tensor | None] = {}  # name -> sorted flat indices of its kept coordinates, or all
        self.perturber: Perturber | None = None
        self.last_update: dict[str, Any] | None = None  # the released g and the stage of the last step
        self.non_finite_examples = 0
        self._sums: Tensor | None = None  # [P] float64: the clipped differences of the current logical step
        self._anchor: dict[str, Tensor] = {}  # theta_s of the trainable (kept) coordinates, a real copy
        self._anchor_stage: int | None = None
        self._pending_kept: dict[str, Tensor | None] | None = None
        self._warned_optimizer = False
        self._checked_coverage = False

    @property
    def method_name(self) -> str:
        return f"DP zeroth-order ({self.zo.num_directions} direction(s), {self.zo.num_stages} stage(s))"

    @property
    def clipping_description(self) -> str:
        return f"{self.config.clipping_function} clipping of each example's finite differences"

    # --------------------------------------------------------------------------------------------- set-up
    def attach(self, model: nn.Module, reducer: Reducer | None = None) -> None:
        """Select the trainable coordinates (SynFlow when pruning) and install the perturbation hooks (``reducer``:
        not needed, the P clipped sums reach it in ``finish_step``)."""
        # the key is final here (a distributed run shares rank 0's before setup): z's public seed derives from it
        self.directions.direction_seed = public_direction_seed(self.ledger.key)
        if self.perturber is None:
            self.model = model
            params = {name: p for name, p in model.named_parameters() if p.requires_grad}  # tied: first name only
            if not params:
                raise ValueError("ZOStep: the LightningModule has no trainable parameter.")
            kept: dict[str, Tensor | None] = dict.fromkeys(params)
            if self._pending_kept is not None:  # a checkpoint's, or one made before sharding (before_sharding)
                pending, self._pending_kept = self._pending_kept, None
                kept = {n: pending.get(n, torch.zeros(0, dtype=torch.long)) for n in params}
            elif self.zo.prune_keep_fraction is not None and self.zo.prune_keep_fraction < 1.0:
                kept = dict(self._prune(model, params))
            kept = {n: (None if i is None else i.to(params[n].device)) for n, i in kept.items()}
            self.params = {n: p for n, p in params.items() if (k := kept[n]) is None or k.numel() > 0}
            self.kept = {n: kept[n] for n in self.params}
            self.perturber = Perturber(model, self.params, self.kept, self.directions)
        self.perturber.install()

    def before_sharding(self, model: nn.Module) -> None:
        """Sharded strategies: run the pruning selection on the full model, before its parameters are sharded.

        Every rank scores its own full copy (the same weights, no data); ``attach`` then uses this selection, in the
        coordinates of the full parameters, and the strategy checks that all ranks agree (``selection_digest``).
        """
        pruning = self.zo.prune_keep_fraction is not None and self.zo.prune_keep_fraction < 1.0
        if self.perturber is not None or self._pending_kept is not None or not pruning:
            return  # attached already, resumed from a checkpoint's selection, or nothing to select
        params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        self._pending_kept = {n: i.cpu() for n, i in self._prune(model, params).items()}

    def selection_digest(self) -> str:
        """A SHA-256 of the kept coordinates: ranks that perturb different coordinates would not agree on z."""
        h = hashlib.sha256()
        for name in sorted(self.kept):
            idx = self.kept[name]
            h.update(name.encode() + (b"*" if idx is None else idx.cpu().numpy().tobytes()))
        return h.hexdigest()

    def _prune(self, model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, Tensor]:
        if any(ds_internals.is_partitioned(p) or torch_internals.dtensor_local(p) is not None for p in params.values()):
            raise ValueError(
                f"ZerothOrderConfig(prune_keep_fraction={self.zo.prune_keep_fraction}): the parameters are sharded "
                "already (ZeRO-3 partitions from deepspeed.zero.Init, or FSDP2 shards from your configure_model), and "
                "SynFlow scores the full weights. Build the model unsharded (dp_zero3 and dp_fsdp select before they "
                "shard it), use strategy 'dp' or 'dp_ddp', or set prune_keep_fraction=None."
            )
        example = getattr(model, "example_input_array", None)
        if example is None:
            raise ValueError(
                f"ZerothOrderConfig(prune_keep_fraction={self.zo.prune_keep_fraction}): SynFlow needs the model's "
                "input shapes: set `self.example_input_array` in the LightningModule (its values are replaced by "
                "ones) and define `forward`; or set prune_keep_fraction=None."
            )
        keep_fraction = self.zo.prune_keep_fraction
        assert keep_fraction is not None  # callers prune only when it is set
        scores = synflow_scores(model, example, params)
        return select_coordinates(scores, keep_fraction=keep_fraction, select=self.zo.prune_select)

    def detach(self) -> None:
        if self.perturber is not None:
            self.perturber.remove()

    @property
    def num_trainable(self) -> int:
        """The number of coordinates perturbed and updated (after pruning)."""
        return sum(ds_internals.numel(p) if (k := self.kept[n]) is None else k.numel() for n, p in self.params.items())

    def _step_index(self) -> int:
        return self.ledger.steps  # logical steps taken so far: the 0-based index of this one

    # --------------------------------------------------------------------------------------- forward passes
    def physical_batch(self, forward: Callable[[], Any], mask: Tensor, device: torch.device) -> tuple[Any, Tensor]:
        """Run one physical batch: 2P forward passes at theta +- beta z, no backward (``forward_differences``)."""
        return self.forward_differences(forward, mask)

    @property
    def probe_engine(self) -> None:
        """Forward passes only: the self-check compares the per-example losses and buffers."""
        return None

    def forward_differences(self, forward: Callable[[], Any], mask: Tensor) -> tuple[Any, Tensor]:
        """Run one physical batch at theta +- beta z_j for every direction; add its clipped differences.

        Args:
            forward: runs ``training_step`` on the physical batch and returns its output.
            mask: 1 for real examples, 0 for padding, shape [p].
        Returns:
            The last output of ``training_step`` and the detached mean over the real examples of
            (l(theta + beta z) + l(theta - beta z)) / 2, an O(beta^2) estimate of the loss at theta (logging only).
        """
        assert self.perturber is not None and self.model is not None, "ZOStep.attach() was not called"
        step = self._step_index()
        beta = self.schedule.at(step).perturbation_scale
        num_dirs, p = self.zo.num_directions, mask.numel()
        diffs = torch.zeros(p, num_dirs, dtype=torch.float64)  # [p, P]
        centre = torch.zeros(p, dtype=torch.float64)
        output: Any = None
        with torch.no_grad(), eval_mode(self.model):
            for j in range(num_dirs):
                losses = []
                for sign in (1.0, -1.0):
                    with self.perturber.perturbed(step=step, direction=j, scale=sign * beta):
                        output = forward()
                    losses.append(per_example_losses(output, p).detach().to("cpu", torch.float64))
                diffs[:, j] = (losses[0] - losses[1]) / (2.0 * beta)
                centre += (losses[0] + losses[1]) / (2.0 * num_dirs)
        self.add_differences(diffs, mask)
        real = mask.to("cpu", torch.float64)
        return output, ((centre * real).sum() / real.sum().clamp(min=1)).float()

    def add_differences(self, diffs: Tensor, mask: Tensor) -> None:
        """Clip each real example's row of ``diffs`` [p, P] jointly to C and add it to the step's sum [P]."""
        real = mask.to(diffs.device).bool()
        norms = diffs.norm(dim=1)  # [p]
        finite = torch.isfinite(norms)
        bad = int((real & ~finite).sum())
        if bad:
            if self.config.non_finite is NonFinitePolicy.RAISE:
                raise FloatingPointError(
                    f"zeroth-order: {bad} example(s) have a non-finite loss difference (PrivacyConfig(non_finite="
                    "'raise')); use non_finite='zero' to drop their contribution instead."
                )
            self.non_finite_examples += bad
        valid = real & finite
        norms = torch.where(valid, norms, torch.zeros_like(norms))
        cfg = self.config
        factors = _FUNCTIONS[str(cfg.clipping_function)](norms, cfg.clip_norm, cfg.stability_constant)  # [p] fp64
        clipped = (
            torch.where(valid[:, None], diffs, torch.zeros_like(diffs)) * torch.where(valid, factors, 0.0)[:, None]
        )
        summed = clipped.sum(0)  # [P]
        self._sums = summed if self._sums is None else self._sums + summed

    # ----------------------------------------------------------------------------------------------- update
    def finish_step(self, optimizer: Optimizer | None, reducer: Reducer) -> None:
        """Noise, normalise and apply the update in place; account the step (``last_update`` holds what was released).

        Args:
            optimizer: the LightningModule's optimizer: only its learning rates are read (when the stage sets none);
                it never steps, so it allocates no state and no gradient buffer.
            reducer: the strategy's: sums the P clipped sums over the ranks and shares rank 0's released numbers.
        Privacy:
            Rank 0 owns the P numbers: it alone draws N(0, sigma^2 C^2 I_P), once per logical step, after the sum
            over the ranks; every rank applies the same update computed from that one draw.
        """
        assert self.perturber is not None, "ZOStep.attach() was not called"
        self.ledger.refuse_past_budget()
        self._check_perturbed()
        step = self._step_index()
        stage = self.schedule.at(step)
        num_dirs = self.zo.num_directions
        sums = self._sums if self._sums is not None else torch.zeros(num_dirs, dtype=torch.float64)
        self._sums = None
        reducer.all_reduce(sums)
        self.ledger.release([sums] if self.ledger.rank == 0 else [])  # noise, / B, and the accounting event
        reducer.broadcast(sums, src=0)
        ghat = sums  # [P]
        lrs = self._learning_rates(optimizer, stage.learning_rate)
        lam = stage.proximal_weight
        if lam > 0 and self._anchor_stage != stage.index:
            self._set_anchor(stage.index)
        elif lam == 0 and self._anchor:
            self._anchor, self._anchor_stage = {}, None  # free the copy while no proximal term is used
        coefficients = [float(g) / num_dirs for g in ghat]
        with torch.no_grad():
            for name, param in self.params.items():
                self._update_param(name, param, coefficients, lr=lrs[name], lam=lam, step=step)
        self.last_update = {"step": step, "stage": stage, "ghat": ghat.clone()}  # g: the released P numbers, fp64

    def _local_part(self, name: str, param: Tensor) -> tuple[Tensor, int, int]:
        """(values, offset, total): the coordinates this rank updates, a flat view, and where they sit in z.

        ``values[k]`` is coordinate ``offset + k`` of the parameter's z-space of length ``total``: the whole flat
        parameter (offset 0); under DeepSpeed ZeRO-3 this rank's partition ``param.ds_tensor`` of the flat full
        parameter (padding excluded); under FSDP2 the rank's local rows of the DTensor (a contiguous slice of the
        flat parameter). Each rank regenerates only its own slice of z.
        """
        local = torch_internals.dtensor_local(param)
        if local is not None:  # FSDP2: this rank's rows of the parameter, a contiguous slice of its flat z
            shape, start = torch_internals.local_shape_and_offset(param)
            if tuple(local.shape) != shape or any(start[1:]):
                placements = getattr(param, "placements", None)
                raise ValueError(
                    f"zeroth-order: parameter {name!r} is sharded as {placements}; only dim-0 sharding "
                    "(FSDP2's fully_shard) is supported."
                )
            row = math.prod(param.shape[1:])
            return _flat(local, name), start[0] * row if local.numel() else 0, param.numel()
        if not ds_internals.is_partitioned(param):
            flat = _flat(param, name)
            return flat, 0, flat.numel()
        lo, hi, total = ds_internals.partition_range(param)
        return ds_internals.partition(param).data.view(-1)[: hi - lo], lo, total

    def _update_param(
        self, name: str, param: Tensor, coefficients: list[float], *, lr: float, lam: float, step: int
    ) -> None:
        """theta <- theta - lr (sum_j c_j z_j + lam (theta - anchor)) on the kept coordinates, one block at a time."""
        values, offset, total, idx = self._local_coordinates(name, param)
        dtype = torch.promote_types(param.dtype, torch.float32)  # bf16 / fp16 parameters: the update in fp32
        end = offset + (values.numel() if idx is None else idx.numel())
        starts = [offset, *range((offset // BLOCK + 1) * BLOCK, end, BLOCK)]  # chunks within one block of z each
        for lo, hi in zip(starts, [*starts[1:], end]):
            acc = torch.zeros(hi - lo, dtype=dtype, device=values.device)  # [chunk]
            for j, c in enumerate(coefficients):
                for _, _, z in self.directions.blocks(
                    step=step, direction=j, name=name, total=total, lo=lo, hi=hi, device=values.device
                ):
                    acc.add_(z.to(dtype), alpha=c)
            a, b = lo - offset, hi - offset  # positions in `values` (or in the kept list)
            current = (values[a:b] if idx is None else values.index_select(0, idx[a:b])).to(dtype)
            if lam > 0:
                acc.add_(current - self._anchor[name][a:b].to(dtype), alpha=lam)
            new = current.sub_(acc, alpha=lr).to(param.dtype)
            if idx is None:
                values[a:b].copy_(new)
            else:
                values.index_copy_(0, idx[a:b], new)

    def _local_coordinates(self, name: str, param: Tensor) -> tuple[Tensor, int, int, Tensor | None]:
        """(values, offset, total, idx): what this rank updates of a parameter, and where it sits in z.

        Without pruning, ``_local_part``'s (values, offset, total) and idx None. Pruned, z lives on the kept
        coordinates (length ``total`` = the number kept): ``idx`` are the positions in ``values`` of the kept
        coordinates this rank holds, and ``offset`` the position in z of the first of them.
        """
        values, start, total = self._local_part(name, param)
        kept = self.kept[name]
        if kept is None:
            return values, start, total, None
        first, last = torch.searchsorted(kept, torch.tensor([start, start + values.numel()], device=kept.device))
        return values, int(first), kept.numel(), kept[int(first) : int(last)] - start

    def _set_anchor(self, stage: int) -> None:
        """theta_s: a real copy (not an alias) of the trainable coordinates this rank updates, at the stage start."""
        with torch.no_grad():
            self._anchor = {}
            for name, p in self.params.items():
                values, _, _, idx = self._local_coordinates(name, p)
                self._anchor[name] = (values if idx is None else values[idx]).clone()
        self._anchor_stage = stage

    def _learning_rates(self, optimizer: Optimizer | None, stage_lr: float | None) -> dict[str, float]:
        if stage_lr is not None:
            return dict.fromkeys(self.params, stage_lr)
        if optimizer is None:
            raise ValueError(
                "ZerothOrderConfig(learning_rate=None) reads the optimizer's learning rate, but there is no optimizer;"
                " set ZerothOrderConfig.learning_rate."
            )
        if not self._warned_optimizer and not isinstance(optimizer, torch.optim.SGD):
            rank_zero_warn(
                f"zeroth-order DP updates the parameters in place by SGD on the noised estimate: "
                f"{type(optimizer).__name__}'s own update rule, state and weight decay are not used, only its "
                "learning rate (and LR schedulers acting on it)."
            )
            self._warned_optimizer = True
        by_id = {id(p): float(group["lr"]) for group in optimizer.param_groups for p in group["params"]}
        missing = [name for name, p in self.params.items() if id(p) not in by_id]
        if missing:
            raise ValueError(
                f"zeroth-order: trainable parameter(s) {missing[:5]} are not in the optimizer, so they have no "
                "learning rate; freeze them (requires_grad_(False)) or give them to the optimizer."
            )
        return {name: by_id[id(p)] for name, p in self.params.items()}

    def _check_perturbed(self) -> None:
        assert self.perturber is not None
        if self._checked_coverage:
            return
        missing = [name for name in self.params if name not in self.perturber.seen]
        if missing:
            raise RuntimeError(
                f"zeroth-order: trainable parameter(s) {missing[:5]} were never perturbed in the first logical step: "
                "they are perturbed by a hook on the module that owns them, so they must be used by calling that "
                "module (not e.g. F.linear(x, self.fc.weight) from its parent), or be frozen with "
                "requires_grad_(False)."
            )
        self._checked_coverage = True

    def epsilon(self) -> float:
        """Epsilon after the logical steps taken (0 before the first)."""
        return self.ledger.epsilon()

    @property
    def delta(self) -> float | None:
        return self.ledger.delta

    # ------------------------------------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        state = self.ledger.state_dict()
        state["zeroth_order"] = {
            "kept": {n: (None if i is None else i.cpu()) for n, i in self.kept.items()} or self._pending_kept,
            "anchor": {n: a.cpu() for n, a in self._anchor.items()},
            "anchor_stage": self._anchor_stage,
            "non_finite_examples": self.non_finite_examples,
        }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the run, and the pruning mask and proximal anchor it was using."""
        if "zeroth_order" not in state:
            raise ValueError(
                "ZOStep: the checkpoint was written by a first-order DP run; resume it with method='first_order'."
            )
        self.ledger.load_state_dict(state)
        zo = state["zeroth_order"]
        self._anchor_stage, self.non_finite_examples = zo["anchor_stage"], zo["non_finite_examples"]
        if self.perturber is None:
            self._pending_kept = zo["kept"]
        elif zo["kept"] is not None:
            assert self.model is not None
            self.detach()
            self.perturber, self._pending_kept = None, zo["kept"]
            self.attach(self.model)
        device = next(iter(self.params.values())).device if self.params else torch.device("cpu")
        self._anchor = {n: a.to(device) for n, a in zo["anchor"].items()}
