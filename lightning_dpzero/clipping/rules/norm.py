"""Normalisation layers with affine parameters: ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and
``nn.InstanceNorm1d/2d/3d``. Per-example gradients are cheap (one value per feature), so they are built directly:
weight: sum over positions of x_hat * b; bias: sum of b; x_hat is the input normalised without the affine part."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import register_rule


def _affine_contributions(
    module: nn.Module,
    x: Tensor,
    grad: Tensor,
    normalize: Callable[[Tensor], Tensor],
    reduce_dims: tuple[int, ...],
    params: Mapping[str, str],
) -> list[Contribution]:
    """x: the layer's input; normalize(rows of x, fp32) -> those rows normalised without the affine part."""
    out = []
    if "weight" in params:
        if reduce_dims and x.shape[0] > 0:
            # A few examples at a time: the normalised input is an fp32 temporary of the activation's size, held
            # with the product it is turned into in place, and the rule may run at the step's peak of memory.
            step = max(1, _CHUNK // max(1, x[0].numel()))
            gw = torch.cat([
                normalize(x[i : i + step].float()).mul_(grad[i : i + step].float()).sum(reduce_dims)
                for i in range(0, x.shape[0], step)
            ])  # fmt: skip
        else:
            gw = normalize(x.float()) * grad.float()
        out.append(Contribution(params["weight"], Kind.SAMPLE, gw, None, full_shape(cast(Tensor, module.weight))))
    if "bias" in params:
        gb = grad.float().sum(reduce_dims) if reduce_dims else grad.float()
        out.append(Contribution(params["bias"], Kind.SAMPLE, gb, None, full_shape(cast(Tensor, module.bias))))
    return out


_CHUNK = 1 << 18  # elements of the input normalised at once


@register_rule(nn.LayerNorm)
def layer_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.LayerNorm)
    k = len(module.normalized_shape)
    reduce_dims = tuple(range(1, activation.dim() - k))  # every dim between the examples and the normalised ones
    return _affine_contributions(
        module, activation, grad_output, lambda x: F.layer_norm(x, module.normalized_shape, eps=module.eps),
        reduce_dims, params,
    )  # fmt: skip


@register_rule(nn.GroupNorm)
def group_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.GroupNorm)
    reduce_dims = tuple(range(2, activation.dim()))  # [n, C, *spatial]
    return _affine_contributions(
        module, activation, grad_output, lambda x: F.group_norm(x, module.num_groups, eps=module.eps), reduce_dims,
        params,
    )  # fmt: skip


@register_rule(nn.RMSNorm)
def rms_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.RMSNorm)
    eps = module.eps
    if eps is None:  # torch's default: the eps of the op-math dtype (fp32 for fp16/bf16 inputs, fp64 for fp64)
        eps = torch.finfo(torch.promote_types(activation.dtype, torch.float32)).eps
    reduce_dims = tuple(range(1, activation.dim() - len(module.normalized_shape)))
    return _affine_contributions(
        module, activation, grad_output, lambda x: F.rms_norm(x, module.normalized_shape, eps=eps), reduce_dims, params
    )


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    if module.training or not module.track_running_stats:
        # Each example normalised by its own statistics; running statistics, if any, only track them.
        def normalize(x: Tensor) -> Tensor:
            return F.instance_norm(x, eps=module.eps)  # [n, C, *spatial]
    else:  # eval with tracked statistics: constants of the model, as torch uses them
        assert module.running_mean is not None and module.running_var is not None  # track_running_stats=True
        mean, var = module.running_mean.float(), module.running_var.float()

        def normalize(x: Tensor) -> Tensor:
            return F.instance_norm(x, mean, var, use_input_stats=False, eps=module.eps)

    reduce_dims = tuple(range(2, activation.dim()))
    return _affine_contributions(module, activation, grad_output, normalize, reduce_dims, params)


__all__ = ["group_norm_rule", "instance_norm_rule", "layer_norm_rule", "rms_norm_rule"]
