"""Per-example clipping without per-example gradients where a ghost norm is cheaper."""

from lightning_dpzero.clipping.contributions import Contribution, Kind
from lightning_dpzero.clipping.engine import ClippingEngine, validate_model
from lightning_dpzero.clipping.functions import clip_factors, register_clipping_function
from lightning_dpzero.clipping.registry import (
    ClippingRule,
    UnsupportedLayerError,
    register_rule,
    registered_layer_types,
    rule_for,
)

__all__ = [
    "ClippingEngine",
    "ClippingRule",
    "Contribution",
    "Kind",
    "UnsupportedLayerError",
    "clip_factors",
    "register_clipping_function",
    "register_rule",
    "registered_layer_types",
    "rule_for",
    "validate_model",
]
