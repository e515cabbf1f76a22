"""The stagewise schedule of DP-ZOSO (Liu et al., arXiv 2402.07818): beta, eta and lambda per stage.

Stage s (0-based) covers the logical steps [T0 (2^s - 1), T0 (2^(s+1) - 1)): it lasts T0 2^s steps, as in the
authors' released code, and the last stage runs until training ends. At the first step of each stage the proximal
anchor theta_s is reset to the current weights. One stage (``num_stages=1``) is DPZero's constant schedule.
"""

from __future__ import annotations

from dataclasses import dataclass

from lightning_dpzero.config import ZerothOrderConfig

__all__ = ["Stage", "StageSchedule"]


@dataclass(frozen=True)
class Stage:
    """The settings in force at one logical step."""

    index: int  # s, 0-based
    first_step: int  # the logical step at which stage s starts
    perturbation_scale: float  # beta_s
    learning_rate: float | None  # eta_s; None: the optimizer's learning rate
    proximal_weight: float  # lambda_s


class StageSchedule:
    """Maps a logical step (0-based: the number of steps taken before it) to its ``Stage``.

    Args:
        config: the zeroth-order settings (``num_stages``, ``stage_length`` and the per-stage values).
    """

    def __init__(self, config: ZerothOrderConfig) -> None:
        self.config = config

    def stage_index(self, step: int) -> int:
        """s such that T0 (2^s - 1) <= step < T0 (2^(s+1) - 1), capped at S - 1."""
        cfg = self.config
        if cfg.num_stages == 1:
            return 0
        assert cfg.stage_length is not None
        s = 0
        while s < cfg.num_stages - 1 and step >= cfg.stage_length * (2 ** (s + 1) - 1):
            s += 1
        return s

    def at(self, step: int) -> Stage:
        """The stage in force at logical step ``step``."""
        if step < 0:
            raise ValueError(f"StageSchedule: the logical step must be >= 0, got {step}.")
        cfg = self.config
        s = self.stage_index(step)
        first = 0 if s == 0 else (cfg.stage_length or 0) * (2**s - 1)
        lr = cfg.stage_value("learning_rate", s)
        return Stage(
            index=s,
            first_step=first,
            perturbation_scale=float(cfg.stage_value("perturbation_scale", s)),  # type: ignore[arg-type]
            learning_rate=None if lr is None else float(lr),
            proximal_weight=float(cfg.stage_value("proximal_weight", s)),  # type: ignore[arg-type]
        )
