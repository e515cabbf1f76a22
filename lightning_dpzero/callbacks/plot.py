"""``PrivacyCurvePlot``: a PNG of epsilon and the validation metric against logical steps, written after each run."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_only, rank_zero_warn
from typing_extensions import override

__all__ = ["PrivacyCurvePlot"]


class PrivacyCurvePlot(Callback):
    """Records the logged ``epsilon`` and validation metric by logical step and plots them when fit or validate ends.

    The history is what was logged (``self.log`` in the module, ``PrivacyBudget`` for epsilon), read from
    ``trainer.callback_metrics``, so it does not depend on which Lightning logger is configured. Epsilon is drawn
    against the left axis, the metric against the right one; a run without a DP strategy has no epsilon curve.
    matplotlib is imported only when plotting; without it the plot is skipped with a warning.

    Args:
        path: where to write the PNG. ``None``: ``privacy_curve.png`` in ``Trainer(default_root_dir)``.
        metric: the validation metric to plot (as logged, e.g. ``"val_loss"`` or ``"val_acc"``).
        epsilon_key: the name under which epsilon is logged (``PrivacyBudget`` logs ``"epsilon"``).

    Attributes:
        epsilon: ``(logical step, epsilon)`` pairs, at most one per step.
        values: ``(logical step, metric)`` pairs, one per validation run (sanity checks excluded).
    """

    def __init__(self, path: str | Path | None = None, metric: str = "val_loss", epsilon_key: str = "epsilon") -> None:
        self.path = None if path is None else Path(path)
        self.metric = metric
        self.epsilon_key = epsilon_key
        self.epsilon: list[tuple[int, float]] = []
        self.values: list[tuple[int, float]] = []
        self.written: Path | None = None

    def _record_epsilon(self, trainer: pl.Trainer) -> None:
        value = trainer.callback_metrics.get(self.epsilon_key)
        if value is None:
            return
        step = trainer.global_step
        if self.epsilon and self.epsilon[-1][0] == step:
            self.epsilon[-1] = (step, float(value))
        elif not self.epsilon or self.epsilon[-1][1] != float(value):  # PLD logs every n steps: keep the changes
            self.epsilon.append((step, float(value)))

    # A value logged in on_train_batch_end reaches callback_metrics after the callbacks' on_train_batch_end, so the
    # epsilon after step k is read when step k + 1 starts, before validation and when training ends.
    @override
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int) -> None:
        self._record_epsilon(trainer)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_epsilon(trainer)

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record_epsilon(trainer)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        value = trainer.callback_metrics.get(self.metric)
        if value is not None:
            step = trainer.global_step
            self.values = [(s, v) for s, v in self.values if s != step] + [(step, float(value))]

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage in ("fit", "validate"):
            self._plot(trainer)

    @rank_zero_only
    def _plot(self, trainer: pl.Trainer) -> None:
        if not self.epsilon and not self.values:
            return
        try:
            import matplotlib

            matplotlib.use("Agg")  # files only; never opens a window
            import matplotlib.pyplot as plt
        except ImportError:
            rank_zero_warn("PrivacyCurvePlot: matplotlib is not installed; skipping the plot (pip install matplotlib).")
            return
        path = self.path or Path(trainer.default_root_dir) / "privacy_curve.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig, ax = plt.subplots(figsize=(6.4, 4.0))
        handles = []
        if self.epsilon:
            steps, eps = zip(*([(0, 0.0)] if self.epsilon[0][0] > 0 else []), *self.epsilon)  # nothing spent at 0
            handles += ax.plot(steps, eps, color="tab:red", drawstyle="steps-post", label="epsilon")
            ax.set_ylabel("epsilon")
        ax.set_xlabel("logical step")
        if self.values:
            other = ax.twinx() if self.epsilon else ax
            steps, values = zip(*[(s, v) for s, v in self.values if math.isfinite(v)] or [(0, float("nan"))])
            handles += other.plot(steps, values, color="tab:blue", marker="o", label=self.metric)
            other.set_ylabel(self.metric)
        ax.legend(handles=handles, loc="best")
        ax.set_title("privacy budget and " + self.metric if self.epsilon else self.metric)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)
        self.written = path
