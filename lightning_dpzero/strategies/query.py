"""One answer to "does this run train privately, and with which step?", for every part of the package.

The command-line entry points, the tasks, the callbacks, the audit and the run summary ask it of a Trainer, a
strategy object or a registered strategy name.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.method import PrivateMethod
from lightning_dpzero.strategies._mixin import DPStrategyMixin

__all__ = ["dp_step", "is_private", "privacy_ledger"]


def dp_step(trainer_or_strategy: Any) -> PrivateMethod | None:
    """The DP step (first- or zeroth-order) of a Trainer's strategy or of a strategy; ``None`` when it is not one
    of this library's DP strategies (it trains without a guarantee)."""
    strategy = getattr(trainer_or_strategy, "strategy", trainer_or_strategy)
    return strategy.dp if isinstance(strategy, DPStrategyMixin) else None


def is_private(trainer_strategy_or_name: Any) -> bool:
    """Whether a Trainer, a strategy, or a strategy name registered with Lightning (``"dp_zero3"``) trains with
    one of this library's DP strategies."""
    if isinstance(trainer_strategy_or_name, str):
        name = trainer_strategy_or_name
        cls = StrategyRegistry[name]["strategy"] if name in StrategyRegistry else None
        return isinstance(cls, type) and issubclass(cls, DPStrategyMixin)
    return dp_step(trainer_strategy_or_name) is not None


def privacy_ledger(trainer_or_strategy: Any) -> PrivacyLedger | None:
    """The privacy ledger (sampling, noise, accounting, budget) of a Trainer's or a strategy's DP method."""
    method = dp_step(trainer_or_strategy)
    return None if method is None else method.ledger
