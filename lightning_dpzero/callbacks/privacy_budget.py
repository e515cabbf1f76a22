"""``PrivacyBudget``: log epsilon every logical step and stop before the budget is spent."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from typing_extensions import override

from lightning_dpzero.config import Accountant
from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.strategies.query import privacy_ledger
from lightning_dpzero.strategies.steering import public_metrics

__all__ = ["PrivacyBudget"]


class PrivacyBudget(Callback):
    """Logs ``epsilon`` (progress bar and loggers) and requests a stop before a step would exceed the budget.

    Args:
        max_epsilon: a budget of its own (useful with a fixed ``noise_multiplier``); the tighter of it and
            ``PrivacyConfig.target_epsilon`` applies. ``None``: the config's target only.
        log_every_n_steps: how often epsilon is computed and logged. ``None``: every step with the RDP accountant
            (microseconds) and every ``Trainer(log_every_n_steps)`` steps with PLD (~0.2-0.8 s per evaluation).

    Privacy:
        The strategy itself refuses any step that would exceed the budget (the hard guarantee); this callback
        makes the stop graceful and visible. Its state is the budget; the accountant history is checkpointed by
        the strategy.
    """

    def __init__(self, max_epsilon: float | None = None, log_every_n_steps: int | None = None) -> None:
        if max_epsilon is not None and not max_epsilon > 0:
            raise ValueError(f"PrivacyBudget: max_epsilon must be positive, got {max_epsilon!r}.")
        if log_every_n_steps is not None and log_every_n_steps < 1:
            raise ValueError(f"PrivacyBudget: log_every_n_steps must be >= 1, got {log_every_n_steps!r}.")
        self.max_epsilon = max_epsilon
        self.log_every_n_steps = log_every_n_steps

    @staticmethod
    def _dp(trainer: pl.Trainer) -> PrivacyLedger:
        dp = privacy_ledger(trainer)
        if dp is None:
            raise TypeError(
                f"PrivacyBudget needs a DP strategy (e.g. strategy='dp'), but the Trainer uses "
                f"{type(trainer.strategy).__name__}."
            )
        return dp

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        dp = self._dp(trainer)
        if self.max_epsilon is not None:
            dp.tighten_budget(self.max_epsilon)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_epsilon is not None:  # again after a resume restored this callback's and the run's budgets
            self._dp(trainer).tighten_budget(self.max_epsilon)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        dp = self._dp(trainer)
        every = self.log_every_n_steps
        if every is None:
            # Trainer.log_every_n_steps is set by Lightning's logger connector, not declared on Trainer
            every = 1 if dp.config.accountant is Accountant.RDP else max(1, trainer.log_every_n_steps)  # type: ignore[attr-defined]
        steps = dp.steps
        if steps and (steps % every == 0 or not dp.may_step()):
            with public_metrics(trainer):  # a function of the step count and q: callbacks may monitor it
                pl_module.log("epsilon", dp.epsilon(), prog_bar=True, on_step=True, on_epoch=False, batch_size=1)
        if not dp.may_step():
            trainer.should_stop = True

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dp = self._dp(trainer)
        if dp.accountant is not None:
            rank_zero_info(
                f"DP-SGD: {dp.accountant.steps} logical steps, epsilon={dp.epsilon():.4g}, delta={dp.delta:.3g}, "
                f"sigma={dp.noise_multiplier:.4g}"
            )

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"max_epsilon": self.max_epsilon}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """A resumed budget can only tighten: the smaller of the checkpointed and the current ``max_epsilon``."""
        stored = state_dict.get("max_epsilon")
        if stored is not None:
            self.max_epsilon = stored if self.max_epsilon is None else min(self.max_epsilon, stored)
