"""Refuse a run that a callback or a scheduler would steer by a metric logged from the private training data.

``EarlyStopping(monitor="train_loss")`` stops the run, ``ModelCheckpoint(monitor="train_loss")`` chooses which
weights are kept, ``ReduceLROnPlateau`` monitoring it cuts the learning rate: each decision is taken on an un-noised
value of the training batches, and the weights it leads to carry no guarantee. A metric logged while training
(``training_step`` or any training hook) is such a value, whatever it computes: the check cannot tell a loss from a
constant. The library's own logged values (``PrivacyBudget``'s epsilon: a function of the step count and the
sampling rate) are exempt.

The check runs where the metric is logged, so it fires before anything reads the value: on the first logical batch
for a metric of ``training_step``, at the end of the first epoch for one of ``on_train_epoch_end``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import lightning.pytorch as pl

from lightning_dpzero._internals import lightning as lightning_internals

__all__ = ["SteeringGuard", "public_metrics", "steering_monitors"]


def steering_monitors(trainer: pl.Trainer) -> dict[str, str]:
    """Monitored metric name -> what monitors it: callbacks with a ``monitor`` (``EarlyStopping``,
    ``ModelCheckpoint`` and any callback following their convention) and plateau schedulers."""
    monitors: dict[str, str] = {}
    for callback in getattr(trainer, "callbacks", ()):  # set by Lightning's callback connector
        key = getattr(callback, "monitor", None)
        if isinstance(key, str) and key:
            monitors.setdefault(key, f"{type(callback).__name__}(monitor={key!r})")
    for config in trainer.lr_scheduler_configs:
        if config.reduce_on_plateau and config.monitor:
            monitors.setdefault(config.monitor, f"{type(config.scheduler).__name__} (its lr_scheduler 'monitor')")
    return monitors


def _logged_names(name: str, options: dict[str, Any]) -> tuple[str, ...]:
    """The names a logged metric is read by: ``name``, and ``name_step`` / ``name_epoch`` where it is logged per
    step and per epoch (Lightning's defaults in ``LightningModule.log``: on_step False, on_epoch True)."""
    if options.get("on_step", False) and options.get("on_epoch", True):
        return name, f"{name}_step", f"{name}_epoch"
    return (name,)


class SteeringGuard:
    """Stands in for the training loop's ``log`` while a DP run trains (``install`` / ``remove``)."""

    def __init__(self, strategy: str, monitors: dict[str, str], log: Callable[..., Any]) -> None:
        self.strategy, self.monitors, self._log = strategy, monitors, log
        self.public = False  # set while the library logs a value computed without the data (``public_metrics``)

    @classmethod
    def install(cls, trainer: pl.Trainer, strategy: str) -> None:
        monitors = steering_monitors(trainer)
        cls.remove(trainer)
        if monitors:
            lightning_internals.set_training_log(
                trainer, cls(strategy, monitors, lightning_internals.training_log(trainer))
            )

    @staticmethod
    def remove(trainer: pl.Trainer) -> None:
        lightning_internals.unset_training_log(trainer)

    def __call__(self, fx: str, name: str, value: Any, *args: Any, **options: Any) -> Any:
        if not self.public:
            for key in _logged_names(name, options):
                if key in self.monitors:
                    raise ValueError(
                        f"{self.strategy}: {self.monitors[key]} reads '{key}', which `{fx}` logs while training: an "
                        "un-noised value of the private training data. Stopping, keeping checkpoints or cutting the "
                        "learning rate by it would steer the run by the data without a guarantee, and the weights "
                        "with it. Monitor a metric logged in `validation_step` on held-out data (e.g. "
                        "monitor='val_loss'), or remove the monitor."
                    )
        return self._log(fx, name, value, *args, **options)


@contextlib.contextmanager
def public_metrics(trainer: pl.Trainer) -> Iterator[None]:
    """``with public_metrics(trainer): pl_module.log(...)``: values the library computes without the data."""
    guard = lightning_internals.training_log(trainer)
    if not isinstance(guard, SteeringGuard):
        yield
        return
    guard.public = True
    try:
        yield
    finally:
        guard.public = False
