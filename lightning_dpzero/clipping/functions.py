"""Clipping functions: per-example scale factors from per-example (per-group) gradient norms."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_dpzero.config import ClippingFunction

__all__ = ["clip_factors", "register_clipping_function", "registered_clipping_functions"]

ClipFn = Callable[[Tensor, float, float], Tensor]  # (norms [n] fp32, threshold C_k, gamma) -> factors [n]

_FUNCTIONS: dict[str, ClipFn] = {
    # min(1, C/n): n = 0 gives C/0 = inf, clamped to 1.
    ClippingFunction.ABADI.value: lambda norms, c, gamma: torch.clamp(c / norms, max=1.0),
    # C/(n + gamma): every clipped gradient has norm C n/(n + gamma) < C (Bu et al. 2206.07136). The learning rate
    # absorbs the constant C: with C = 1 this is "AUTO-S"; no factor is folded in silently.
    ClippingFunction.AUTOMATIC.value: lambda norms, c, gamma: c / (norms + gamma),
}


def register_clipping_function(name: str, fn: ClipFn) -> None:
    """Make ``PrivacyConfig(clipping_function=name)`` use ``fn(norms, C_k, gamma) -> factors``.

    Privacy:
        The accountant assumes each example's clipped gradient has norm <= C: ``fn`` must return factors with
        ``factors * norms <= C_k`` for every norm (this is checked on a grid of norms when registering).
    """
    key = name.lower()
    if key in _FUNCTIONS:
        raise ValueError(f"a clipping function named {name!r} is already registered.")
    grid = torch.cat([torch.zeros(1), torch.logspace(-6, 6, 200)])
    for c in (0.1, 1.0, 10.0):
        factors = fn(grid, c, 0.01)
        if factors.shape != grid.shape or not bool(((factors * grid) <= c * (1 + 1e-6)).all()):
            raise ValueError(f"clipping function {name!r} lets a gradient of norm n exceed C after scaling.")
    _FUNCTIONS[key] = fn


def registered_clipping_functions() -> list[str]:
    return list(_FUNCTIONS)


def clip_factors(
    norms: Tensor, mask: Tensor, *, clip_norm: float | Tensor, fn: ClippingFunction | str, stability_constant: float
) -> Tensor:
    """Per-example scale factors so that each clipped gradient has L2 norm <= ``clip_norm``.

    Args:
        norms: per-example gradient L2 norms, shape [n], fp32 (or [groups, n] for the built-in functions).
        mask: 1 for real examples, 0 for padding, shape [n].
        clip_norm: the threshold C (or C_k of one group), in the units of ``norms`` (or a [groups, 1] column of them
            for the built-in functions).
        fn: ``ABADI`` gives min(1, C/n); ``AUTOMATIC`` gives C/(n + gamma); or a registered name.
        stability_constant: gamma of ``AUTOMATIC``.
    Returns:
        Factors of shape [n], fp32; exactly 0 where ``mask`` is 0, even if a padded norm is not finite.
    Privacy:
        Bounds each example's contribution by C, the sensitivity the accountant assumes.
    """
    norms = norms if norms.dtype == torch.float32 else norms.float()  # (a cast dispatches even when it is a no-op)
    factors = _FUNCTIONS[str(fn)](norms, clip_norm, stability_constant)  # type: ignore[arg-type]
    return torch.where(mask if mask.dtype == torch.bool else mask.bool(), factors, 0.0)
