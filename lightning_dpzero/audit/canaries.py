"""White-box gradient canaries that flow through the real DP strategy as ordinary training examples.

The audited model is wrapped in ``CanaryModule``, which owns one extra trainable vector u of dimension m (an
``nn.Embedding(m, 1)``, so the clipping engine clips it with its registered rule). Canary j is a training example
whose loss is ``-w * u_j`` (w = ``canary_gradient_norm`` >> C): its per-example gradient is ``-w e_j``, which any
correct clipping brings to norm <= C, and it touches no other parameter. Ordinary examples run the user's model and
never touch u. The strategy then samples (Poisson), clips, sums, noises and normalises canaries and examples together,
exactly as in the user's run; ``CanaryObserver`` reads u after every logical step. With plain SGD at learning rate 1
on u, step t moves u_j by (s 1[j sampled at t] + N(0, sigma^2 C^2)) / B, where s <= C is the clipped canary norm.

Notation: m canaries, w their gradient norm, C the clip norm, B = qN the expected logical batch, T logical steps.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from typing_extensions import override

from lightning_dpzero._internals import deepspeed as ds_internals

__all__ = ["AuditConfig", "CanaryDataset", "CanaryModule", "CanaryObserver", "canary_dataloader", "draw_inclusion"]

CANARY_PARAMETER = "canary.weight"  # the canonical name of u in CanaryModule


@dataclass(frozen=True, kw_only=True)
class AuditConfig:
    """Settings of a one-run canary audit.

    Args:
        num_canaries: m. More canaries allow more guesses r, and the bound can never exceed about log(r / 3) at 95%
            confidence (all r guesses right), so m bounds the largest epsilon an audit can certify.
        canary_gradient_norm: w, the norm of each canary's gradient before clipping; far above the clip norm C, so
            a correct clipping is what brings it down to C.
        confidence: the confidence of the lower bound (e.g. 0.95).
        guess_fractions: the auditor tries k = fraction * m for each fraction, guessing "in" for the k highest
            scores either alone or together with "out" for the k lowest. The confidence is split evenly over these
            2 * len(guess_fractions) attempts (Bonferroni), so taking the best one is still a valid bound.
        seed: draws which canaries are included (each with probability 1/2); the same on every rank.
        canary_lr: SGD learning rate of u (u's movement is then lr times the released noisy gradient coordinate).

    Privacy:
        The audit trains a separate model on the user's data plus the included canaries; it releases the scores and
        the bound, which are post-processing of that run's (differentially private) parameters.
    """

    num_canaries: int = 1000
    canary_gradient_norm: float = 100.0
    confidence: float = 0.95
    guess_fractions: tuple[float, ...] = (0.05, 0.1, 0.2)
    seed: int = 0
    canary_lr: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.guess_fractions, list):  # Hydra passes lists
            object.__setattr__(self, "guess_fractions", tuple(self.guess_fractions))
        if isinstance(self.num_canaries, bool) or not isinstance(self.num_canaries, int) or self.num_canaries < 2:
            raise ValueError(f"AuditConfig: `num_canaries` must be an integer >= 2, got {self.num_canaries!r}.")
        if not self.canary_gradient_norm > 0:
            raise ValueError(
                f"AuditConfig: `canary_gradient_norm` must be positive, got {self.canary_gradient_norm!r}."
            )
        if not 0.0 < self.confidence < 1.0:
            raise ValueError(f"AuditConfig: `confidence` must be in (0, 1), got {self.confidence!r}.")
        if not self.guess_fractions or any(not 0.0 < f <= 0.5 for f in self.guess_fractions):
            raise ValueError(
                f"AuditConfig: `guess_fractions` must be non-empty fractions in (0, 0.5], got {self.guess_fractions!r}."
            )
        if not self.canary_lr > 0:
            raise ValueError(f"AuditConfig: `canary_lr` must be positive, got {self.canary_lr!r}.")


def draw_inclusion(num_canaries: int, seed: int) -> np.ndarray:
    """Which canaries are in the training set: shape [m] bool, each True independently with probability 1/2."""
    return np.random.default_rng(np.random.SeedSequence([seed, 0xA0D17])).random(num_canaries) < 0.5


class CanaryDataset(Dataset):
    """The user's training examples followed by the included canaries.

    Items are ``(example, canary_id)``: ``canary_id`` is -1 for the user's examples; a canary row carries a copy of
    example 0 as filler (its loss is multiplied by 0, so it contributes nothing but the canary gradient).

    Args:
        dataset: the user's map-style training dataset.
        canary_ids: the included canaries' indices in [0, m).
    """

    def __init__(self, dataset: Dataset, canary_ids: np.ndarray) -> None:
        self.dataset = dataset
        self.num_examples = len(dataset)  # type: ignore[arg-type]
        if self.num_examples == 0:
            raise ValueError("lightning_dpzero.audit: the training dataset is empty.")
        self.canary_ids = [int(j) for j in canary_ids]

    def __len__(self) -> int:
        return self.num_examples + len(self.canary_ids)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        if index < self.num_examples:
            return self.dataset[index], -1
        return self.dataset[0], self.canary_ids[index - self.num_examples]


class _CanaryCollate:
    """The user's collate function on the examples, plus the canary ids as a [p] long tensor."""

    def __init__(self, collate_fn: Callable[[list[Any]], Any]) -> None:
        self.collate_fn = collate_fn

    def __call__(self, items: list[tuple[Any, int]]) -> tuple[Any, Tensor]:
        return self.collate_fn([example for example, _ in items]), torch.tensor([j for _, j in items])


def canary_dataloader(loader: DataLoader, included: np.ndarray) -> DataLoader:
    """The user's training loader over ``CanaryDataset``: same batch size, collate function and workers.

    The DP strategy replaces its sampling by Poisson sampling over the N = n + (included canaries) examples.
    """
    return DataLoader(
        CanaryDataset(loader.dataset, np.flatnonzero(included)),
        batch_size=loader.batch_size,
        shuffle=True,
        collate_fn=_CanaryCollate(loader.collate_fn),
        num_workers=loader.num_workers,
    )


def _no_log(*args: Any, **kwargs: Any) -> None:
    """Replaces the wrapped module's ``log``/``log_dict``: it is not the module the Trainer runs."""


class CanaryModule(pl.LightningModule):
    """The audited module plus the canary vector u: per-example losses of the user's examples and of the canaries.

    Args:
        model: the user's LightningModule; its ``training_step`` must return per-example losses of shape [p] (or a
            dict with ``per_example_loss``), the form DP training prefers.
        num_canaries: m.
        canary_gradient_norm: w.
        canary_lr: SGD learning rate of u.

    The wrapped module's ``log`` and ``log_dict`` are silenced (it is not the module the Trainer runs): pass a fresh
    instance. The optimizer is plain SGD (no momentum, no weight decay) over the user's parameter groups with their
    learning rates, plus u: the optimizer is post-processing of the privatised gradient, outside the guarantee, and
    SGD makes u's movement the released gradient coordinate itself.
    """

    def __init__(self, model: pl.LightningModule, *, num_canaries: int, canary_gradient_norm: float, canary_lr: float):
        super().__init__()
        self.model = model
        self.canary = nn.Embedding(num_canaries, 1)
        nn.init.zeros_(self.canary.weight)
        self.canary_gradient_norm = canary_gradient_norm
        self.canary_lr = canary_lr
        model.log = _no_log  # type: ignore[method-assign]
        model.log_dict = _no_log  # type: ignore[method-assign]

    def training_step(self, batch: tuple[Any, Tensor], batch_idx: int) -> Tensor:
        examples, ids = batch  # ids: [p], -1 for the user's examples
        output = self.model.training_step(examples, batch_idx)
        losses = output.get("per_example_loss") if isinstance(output, Mapping) else output
        p = ids.shape[0]
        if not isinstance(losses, Tensor) or losses.shape != (p,):
            shape = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
            raise ValueError(
                f"lightning_dpzero.audit: {type(self.model).__name__}.training_step returned a loss of shape {shape}; "
                f"the audit needs per-example losses of shape [{p}] (return them, or a dict with 'per_example_loss') "
                "so that canary rows can be separated from the user's examples."
            )
        is_canary = ids >= 0
        u = self.canary(ids.clamp(min=0)).squeeze(-1)  # [p]; every row passes through, so the engine sees dim 0 = p
        # Canary rows: loss -w u_j, gradient -w e_j (the user's loss on the filler example gets a zero gradient);
        # the user's rows: their own loss, whose gradient with respect to u is exactly zero.
        canary_loss = -self.canary_gradient_norm * u * is_canary.to(u.dtype)  # [p]
        return torch.where(is_canary, canary_loss.to(losses.dtype), losses)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        inner = self.model.configure_optimizers()
        if isinstance(inner, Mapping):
            inner = inner["optimizer"]
        elif isinstance(inner, (list, tuple)):
            inner = inner[0]
            if isinstance(inner, (list, tuple)):
                inner = inner[0]
        optimizer = cast(torch.optim.Optimizer, inner)  # the wrapped task's one optimizer, unwrapped above
        groups = [{"params": list(g["params"]), "lr": g.get("lr", 1e-3)} for g in optimizer.param_groups]
        groups.append({"params": [self.canary.weight], "lr": self.canary_lr})
        return torch.optim.SGD(groups, lr=self.canary_lr, momentum=0.0, weight_decay=0.0)


def full_canary_weights(module: CanaryModule) -> Tensor:
    """u as a full fp32 vector on CPU on every rank (gathered under ZeRO-3, ``full_tensor`` under FSDP2)."""
    weight = module.canary.weight
    if hasattr(weight, "full_tensor"):
        return weight.full_tensor().detach().float().flatten().cpu()
    gather: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
    if ds_internals.is_partitioned(weight):
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([weight])
    with gather:
        return weight.detach().float().flatten().cpu().clone()


class CanaryObserver(Callback):
    """Reads u after every logical step: ``increments[t]`` is u's movement in step t, shape [m] each.

    Only steps where the optimizer stepped are recorded (a step refused by the privacy budget moves nothing). Under
    ZeRO-3 reading u is a collective: every rank runs this callback.
    """

    def __init__(self) -> None:
        self.increments: list[Tensor] = []
        self._last: Tensor | None = None
        self._last_step = 0

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        assert isinstance(pl_module, CanaryModule), "CanaryObserver observes a CanaryModule"
        self._last, self._last_step = full_canary_weights(pl_module), trainer.global_step

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if trainer.global_step == self._last_step:
            return
        assert isinstance(pl_module, CanaryModule) and self._last is not None
        current = full_canary_weights(pl_module)
        self.increments.append(current - self._last)
        self._last, self._last_step = current, trainer.global_step
