"""Pieces shared by the classification tasks: a DP-clippable Transformer encoder block, the optimizer choice, and
the classification LightningModule.

Shapes: n examples, S positions, D features, K classes.

DP-compatibility rules every task model follows (README, "Clipping engine"): each trainable parameter lives in a
supported module (Linear, Conv, Embedding, LayerNorm, GroupNorm, ``DPMultiheadAttention``) and is only used through
that module's call; no module output is broadcast over the examples (position and class-token embeddings are looked
up with one row of ids per example); no BatchNorm.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import Enum

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.classification import MulticlassAccuracy

from lightning_dpzero.layers import DPMultiheadAttention

__all__ = ["ClassifierTask", "EncoderBlock", "OptimizerName", "build_optimizer", "optimizer_name"]


class EncoderBlock(nn.Module):
    """Pre-LayerNorm Transformer encoder block from clippable parts: LayerNorm, DPMultiheadAttention, two Linears.

    Args:
        dim: D, the model width.
        heads: attention heads (must divide ``dim``).
        mlp_ratio: hidden width of the feed-forward layer in units of D.
        dropout: dropout after attention and the feed-forward layer (0 disables it).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DPMultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, padding_mask: Tensor | None = None) -> Tensor:
        """x [n, S, D], padding_mask [n, S] (True: a padding position no query attends to) -> [n, S, D]."""
        h = self.norm1(x)
        attended, _ = self.attn(h, h, h, key_padding_mask=padding_mask, need_weights=False)
        x = x + self.dropout(attended)
        return x + self.dropout(self.out(F.gelu(self.fc(self.norm2(x)))))


class OptimizerName(str, Enum):
    """Optimizers a task can build (the values are the YAML/CLI strings)."""

    SGD = "sgd"
    ADAMW = "adamw"


_OPTIMIZERS: dict[OptimizerName, Callable[..., torch.optim.Optimizer]] = {
    OptimizerName.SGD: lambda params, lr, momentum, weight_decay: torch.optim.SGD(
        params, lr=lr, momentum=momentum, weight_decay=weight_decay
    ),
    OptimizerName.ADAMW: lambda params, lr, momentum, weight_decay: torch.optim.AdamW(
        params, lr=lr, betas=(momentum, 0.999), weight_decay=weight_decay
    ),
}


def build_optimizer(
    name: str, params: Iterable[nn.Parameter], *, lr: float, momentum: float, weight_decay: float, owner: str
) -> torch.optim.Optimizer:
    """``sgd`` (momentum = SGD momentum) or ``adamw`` (momentum = beta1).

    Raises:
        ValueError: an unknown optimizer name (the message lists the allowed ones).
    """
    return _OPTIMIZERS[optimizer_name(name, owner=owner)](params, lr, momentum, weight_decay)


def optimizer_name(name: str, *, owner: str) -> OptimizerName:
    """``name`` as an ``OptimizerName``; raises ValueError listing the allowed names."""
    try:
        return OptimizerName(name)
    except ValueError:
        allowed = ", ".join(repr(m.value) for m in OptimizerName)
        raise ValueError(f"{owner}: optimizer={name!r} is not one of {allowed}.") from None


class ClassifierTask(L.LightningModule):
    """Cross-entropy classification around ``net`` (inputs [n, ...] -> logits [n, K]).

    ``training_step`` returns ``{"loss": mean, "per_example_loss": [n]}``: DP strategies clip each example's
    gradient from the per-example losses, other strategies use the mean. Validation logs ``val_loss`` and
    ``val_acc`` (torchmetrics, micro-averaged accuracy).

    Privacy:
        ``train_loss`` is logged from the (private) training batches without noise, as most training scripts do;
        it is a diagnostic, not covered by the guarantee. Validation metrics come from the held-out split.
    """

    def __init__(
        self,
        net: nn.Module,
        *,
        num_classes: int,
        optimizer: str,
        lr: float,
        momentum: float,
        weight_decay: float,
    ) -> None:
        super().__init__()
        self.net = net
        self.num_classes = num_classes
        self.optimizer_name, self.lr = optimizer, lr
        self.momentum, self.weight_decay = momentum, weight_decay
        optimizer_name(optimizer, owner=type(self).__name__)  # refuse a typo now, not at the first step
        self.val_acc = MulticlassAccuracy(num_classes=num_classes, average="micro")

    def forward(self, inputs: Tensor) -> Tensor:
        return self.net(inputs)

    def per_example_loss(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        """Returns (per-example cross-entropy [n], logits [n, K])."""
        inputs, labels = batch
        logits = self.net(inputs)
        return F.cross_entropy(logits, labels, reduction="none"), logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        losses, _ = self.per_example_loss(batch)
        self.log("train_loss", losses.mean(), prog_bar=True, sync_dist=True)
        return {"loss": losses.mean(), "per_example_loss": losses}

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        losses, logits = self.per_example_loss(batch)
        self.val_acc(logits, batch[1])
        self.log("val_loss", losses.mean(), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return build_optimizer(
            self.optimizer_name,
            self.parameters(),
            lr=self.lr,
            momentum=self.momentum,
            weight_decay=self.weight_decay,
            owner=type(self).__name__,
        )
