"""Per-layer clipping rules, registered by module type.

A rule turns one call of a module (its input, recorded in the forward pass, and the gradient of its output,
seen in the backward pass) into factored per-example gradient ``Contribution``s for its trainable parameters.
Lookup is by exact type: a subclass may change ``forward``, and a wrong rule is a silent privacy bug, so a
subclass is refused unless a rule is registered for it (``register_rule(MyLinear)(linear_rule)``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Protocol

from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution

__all__ = [
    "ClippingRule",
    "UnsupportedLayerError",
    "register_rule",
    "register_rule_by_name",
    "registered_layer_types",
    "rule_for",
]


class ClippingRule(Protocol):
    """Builds the per-example gradient contributions of one module call.

    Args:
        module: the module that was called.
        activation: its first positional input, detached, shape [n, ...] (examples first).
        grad_output: the gradient of the summed per-example losses w.r.t. its output, shape [n, ...].
        params: attribute name (``"weight"``, ``"bias"``) -> canonical parameter name, for the trainable
            parameters of ``module`` only.
    Returns:
        One or more contributions per trainable parameter.
    """

    def __call__(
        self, module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
    ) -> list[Contribution]: ...


_RULES: dict[type[nn.Module], ClippingRule] = {}
_CHECKS: dict[type[nn.Module], Callable[[nn.Module, str], None]] = {}
# Rules for classes of other packages, by "module.QualName", so that the package is not imported to register them.
_NAMED_RULES: dict[str, ClippingRule] = {}

_ADVICE: dict[str, str] = {
    "BatchNorm": "it mixes the examples of a batch, so per-example gradients do not exist; replace it with "
    "GroupNorm (e.g. nn.GroupNorm(min(32, C), C)) or LayerNorm",
    "SyncBatchNorm": "it mixes the examples of a batch; replace it with GroupNorm",
    "MultiheadAttention": "its fused input projection has no per-example rule; swap in the drop-in "
    "lightning_dpzero.layers.DPMultiheadAttention with lightning_dpzero.layers.replace_multihead_attention(model)",
}


class UnsupportedLayerError(TypeError):
    """A trainable module has no clipping rule; the message names its path and the fix."""

    def __init__(self, path: str, module: nn.Module, reason: str | None = None) -> None:
        given = reason
        kind = type(module).__name__
        advice = next((text for prefix, text in _ADVICE.items() if kind.startswith(prefix)), None)
        if reason is None:
            reason = advice or (
                "there is no per-example clipping rule for this layer type. Supported: "
                f"{', '.join(sorted(t.__name__ for t in _RULES))}. Freeze its parameters "
                "(requires_grad_(False)), or register a rule with "
                "lightning_dpzero.clipping.register_rule"
            )
        super().__init__(f"module '{path or '<root>'}' ({kind}): {reason}.")
        self.path = path
        self.no_rule = given is None  # no rule at all (the fallback may take it), not a setting the rule refuses


def register_rule(*types: type[nn.Module], check: Callable[[nn.Module, str], None] | None = None):
    """Decorator registering a rule for exactly these module types (subclasses are not matched).

    Args:
        check: optional ``check(module, path)`` run when a model is validated; raises
            ``UnsupportedLayerError`` for settings the rule cannot handle (e.g. ``Embedding(max_norm=...)``).
    """

    def decorator(rule: ClippingRule) -> ClippingRule:
        for t in types:
            _RULES[t] = rule
            if check is not None:
                _CHECKS[t] = check
        return rule

    return decorator


def register_rule_by_name(*qualified_names: str):
    """Decorator registering a rule for classes named ``"package.module.ClassName"`` (exact class, as
    ``register_rule``), without importing their package."""

    def decorator(rule: ClippingRule) -> ClippingRule:
        for name in qualified_names:
            _NAMED_RULES[name] = rule
        return rule

    return decorator


def _declared_type(module: nn.Module) -> type[nn.Module]:
    """The module's own class; FSDP2's ``fully_shard`` swaps in ``FSDP<Class>(FSDPModule, <Class>)``, which keeps
    the forward of ``<Class>``, so the rule of ``<Class>`` applies to it."""
    cls = type(module)
    bases = cls.__bases__
    if len(bases) == 2 and bases[0].__name__ == "FSDPModule" and cls.__name__ == f"FSDP{bases[1].__name__}":
        return bases[1]
    return cls


def rule_for(module: nn.Module, path: str) -> ClippingRule:
    """The rule for ``module``'s exact type, after its settings check; raises ``UnsupportedLayerError``.

    A subclass that does not override ``forward`` computes what its registered parent does, so it gets the parent's
    rule (and check); one that overrides it does not.
    """
    cls = _declared_type(module)
    rule = _RULES.get(cls) or _NAMED_RULES.get(f"{cls.__module__}.{cls.__qualname__}")
    if rule is None:
        parent = next((base for base in cls.__mro__[1:] if base in _RULES and cls.forward is base.forward), None)
        if parent is None:
            raise UnsupportedLayerError(path, module)
        cls, rule = parent, _RULES[parent]
    if (check := _CHECKS.get(cls)) is not None:
        check(module, path)
    return rule


def registered_layer_types() -> list[type[nn.Module]]:
    """Every module type with a rule, in registration order."""
    return list(_RULES)
