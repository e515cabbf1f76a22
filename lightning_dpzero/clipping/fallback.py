"""Opt-in fallback for trainable modules without a rule: per-example gradients with ``torch.func``.

For one call of ``module`` on input x [n, ...] with output gradient B [n, ...], example i's gradient with respect
to the module's own parameters theta is grad_theta <module(theta, x_i), B_i>, computed for every i at once with
``vmap(grad(...))``. This instantiates per-example gradients ([n, *param.shape] per parameter) and re-runs the
module's forward in the backward pass, so it is slower than a rule; it is used only when
``PrivacyConfig(functorch_fallback=True)``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution, Kind

__all__ = ["functorch_rule"]


def functorch_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    own = {attr: getattr(module, attr).detach() for attr in params}

    def weighted_output(theta: dict[str, Tensor], x: Tensor, b: Tensor) -> Tensor:
        y = torch.func.functional_call(module, theta, (x.unsqueeze(0),), strict=False)
        return (y * b.unsqueeze(0)).sum()

    grads = torch.func.vmap(torch.func.grad(weighted_output), in_dims=(None, 0, 0))(own, activation, grad_output)
    return [Contribution(params[attr], Kind.SAMPLE, grads[attr], None, own[attr].shape) for attr in params]
