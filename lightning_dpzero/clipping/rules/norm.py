"""``nn.LayerNorm`` and ``nn.GroupNorm``: per-example gradients are cheap (one value per feature), so they are
built directly: weight sum over positions of x_hat * b, bias sum of b, with x_hat the normalised input."""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution, Kind
from lightning_dpzero.clipping.registry import register_rule


def _affine_contributions(
    module: nn.Module, x_hat: Tensor, grad: Tensor, reduce_dims: tuple[int, ...], params: Mapping[str, str]
) -> list[Contribution]:
    out = []
    if "weight" in params:
        gw = (x_hat * grad).sum(reduce_dims) if reduce_dims else x_hat * grad
        out.append(Contribution(params["weight"], Kind.SAMPLE, gw, None, module.weight.shape))
    if "bias" in params:
        gb = grad.sum(reduce_dims) if reduce_dims else grad
        out.append(Contribution(params["bias"], Kind.SAMPLE, gb, None, module.bias.shape))
    return out


@register_rule(nn.LayerNorm)
def layer_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.LayerNorm)
    x = activation.float()
    x_hat = F.layer_norm(x, module.normalized_shape, eps=module.eps)
    k = len(module.normalized_shape)
    reduce_dims = tuple(range(1, x.dim() - k))  # every dim between the examples and the normalised ones
    return _affine_contributions(module, x_hat, grad_output.float(), reduce_dims, params)


@register_rule(nn.GroupNorm)
def group_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.GroupNorm)
    x = activation.float()
    x_hat = F.group_norm(x, module.num_groups, eps=module.eps)  # [n, C, *spatial]
    reduce_dims = tuple(range(2, x.dim()))
    return _affine_contributions(module, x_hat, grad_output.float(), reduce_dims, params)


__all__ = ["group_norm_rule", "layer_norm_rule"]
