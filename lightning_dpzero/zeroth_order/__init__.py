"""Zeroth-order DP fine-tuning (DP-ZO / DPZero / stagewise DP-ZOSO with data-free pruning), at inference memory.

Selected with ``PrivacyConfig(method="zeroth_order", zeroth_order=ZerothOrderConfig(...))``; every strategy that
supports it runs ``ZOStep`` in place of ``DPStep`` (both are ``PrivateMethod``s).
"""

from lightning_dpzero.zeroth_order.perturbation import DirectionSampler, Perturber
from lightning_dpzero.zeroth_order.pruning import select_coordinates, synflow_scores
from lightning_dpzero.zeroth_order.schedule import Stage, StageSchedule
from lightning_dpzero.zeroth_order.step import ZOStep, public_direction_seed

__all__ = [
    "DirectionSampler",
    "Perturber",
    "Stage",
    "StageSchedule",
    "ZOStep",
    "public_direction_seed",
    "select_coordinates",
    "synflow_scores",
]
