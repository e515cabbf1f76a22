"""Normalisation layers with affine parameters: ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm`` and
``nn.InstanceNorm1d/2d/3d``. Per-example gradients are cheap (one value per feature), so they are built directly:
weight: sum over positions of x_hat * b; bias: sum of b; x_hat is the input normalised without the affine part.

A LayerNorm or GroupNorm normalises with the mean and reciprocal standard deviation its forward saved for its own
backward (``forward_statistics``; 2-3x faster than normalising again, which recomputes them); the rule recomputes
them where they are not at hand."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero._internals.torch import group_norm_affine_gradients, native_norm_statistics
from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import register_rule

Statistics = tuple[Tensor, Tensor]  # (mean, rstd), as torch's native layer and group norm save them
Normalize = Callable[[Tensor, slice], Tensor]  # (rows of the input in fp32, which examples they are) -> x_hat rows

# Which native norm each layer type runs (its forward's statistics: _internals.torch.native_norm_statistics).
_NATIVE_KIND = {nn.LayerNorm: "layer", nn.GroupNorm: "group"}


def forward_statistics(module: nn.Module, output: Tensor) -> Statistics | None:
    """The (mean, rstd) that a LayerNorm's or GroupNorm's forward saved for its backward, read from the autograd
    node of ``output`` right after the forward. ``None`` where they are not at hand: another layer type, an output
    that is not torch's native node's, or saved tensors behind pack hooks (checkpointing: reading one would
    recompute it). The rules check their shapes against the input they are given before using them."""
    kind = _NATIVE_KIND.get(type(module))
    return None if kind is None else native_norm_statistics(output, kind)


def _affine_contributions(
    module: nn.Module,
    x: Tensor,
    grad: Tensor,
    normalize: Normalize,
    reduce_dims: tuple[int, ...],
    params: Mapping[str, str],
) -> list[Contribution]:
    """x: the layer's input; normalize(rows of x in fp32, their examples) -> those rows normalised without the affine
    part, a fresh tensor."""
    out = []
    if "weight" in params:
        if reduce_dims and x.shape[0] > 0:
            # A few examples at a time: the normalised input is an fp32 temporary of the activation's size, held
            # with the product it is turned into in place, and the rule may run at the step's peak of memory.
            step = max(1, _CHUNK // max(1, x[0].numel()))
            if step >= x.shape[0]:  # one chunk: no slices, no concatenation (~10 us a call)
                gw = normalize(x.float(), slice(None)).mul_(grad.float()).sum(reduce_dims)
            else:
                gw = torch.cat([
                    normalize(x[i : i + step].float(), slice(i, i + step)).mul_(grad[i : i + step].float())
                    .sum(reduce_dims)
                    for i in range(0, x.shape[0], step)
                ])  # fmt: skip
        else:
            gw = normalize(x.float(), slice(None)) * grad.float()
        out.append(Contribution(params["weight"], Kind.SAMPLE, gw, None, full_shape(cast(Tensor, module.weight))))
    if "bias" in params:
        gb = grad.float().sum(reduce_dims) if reduce_dims else grad.float()
        out.append(Contribution(params["bias"], Kind.SAMPLE, gb, None, full_shape(cast(Tensor, module.bias))))
    return out


_CHUNK = 1 << 18  # elements of the input normalised at once


@register_rule(nn.LayerNorm)
def layer_norm_rule(
    module: nn.Module,
    activation: Tensor,
    grad_output: Tensor,
    params: Mapping[str, str],
    statistics: Statistics | None = None,
) -> list[Contribution]:
    assert isinstance(module, nn.LayerNorm)
    k = len(module.normalized_shape)
    reduce_dims = tuple(range(1, activation.dim() - k))  # every dim between the examples and the normalised ones
    normalize: Normalize = lambda x, rows: F.layer_norm(x, module.normalized_shape, eps=module.eps)  # noqa: E731
    if _fits(statistics, (*activation.shape[: activation.dim() - k], *(1,) * k)):
        assert statistics is not None
        mean, rstd = (s.float() for s in statistics)
        normalize = lambda x, rows: (x - _take(mean, rows)).mul_(_take(rstd, rows))  # noqa: E731
    return _affine_contributions(module, activation, grad_output, normalize, reduce_dims, params)


@register_rule(nn.GroupNorm)
def group_norm_rule(
    module: nn.Module,
    activation: Tensor,
    grad_output: Tensor,
    params: Mapping[str, str],
    statistics: Statistics | None = None,
) -> list[Contribution]:
    assert isinstance(module, nn.GroupNorm)
    reduce_dims = tuple(range(2, activation.dim()))  # [n, C, *spatial]
    groups = module.num_groups
    normalize: Normalize = lambda x, rows: F.group_norm(x, groups, eps=module.eps)  # noqa: E731
    if _fits(statistics, (activation.shape[0], groups)):
        assert statistics is not None
        if (
            activation.dtype == grad_output.dtype == statistics[0].dtype
            and activation.is_contiguous()
            and grad_output.is_contiguous()
        ):  # both at once, in one pass of torch's own backward kernel (2.5-3x faster)
            weight, bias = group_norm_affine_gradients(grad_output, activation, *statistics, groups=groups)
            module_ = cast(nn.GroupNorm, module)
            return [
                Contribution(params[name], Kind.SAMPLE, value.float(), None, full_shape(getattr(module_, name)))
                for name, value in (("weight", weight), ("bias", bias))
                if name in params
            ]
        mean, rstd = (s.float().unsqueeze(-1) for s in statistics)  # [n, groups, 1]

        def normalize(x: Tensor, rows: slice) -> Tensor:
            return (x.reshape(x.shape[0], groups, -1) - _take(mean, rows)).mul_(_take(rstd, rows)).view(x.shape)

    return _affine_contributions(module, activation, grad_output, normalize, reduce_dims, params)


def _take(statistic: Tensor, rows: slice) -> Tensor:
    """The rows ``rows`` of a statistic (no slicing operator for all of them)."""
    return statistic if rows == _ALL else statistic[rows]


_ALL = slice(None)


def _fits(statistics: Statistics | None, shape: tuple[int, ...]) -> bool:
    """Whether the forward's statistics are those of this input: one (mean, rstd) per normalised row, examples first."""
    return statistics is not None and all(tuple(s.shape) == tuple(shape) for s in statistics)


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
        module, activation, grad_output, lambda x, rows: F.rms_norm(x, module.normalized_shape, eps=eps), reduce_dims,
        params,
    )  # fmt: skip


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def instance_norm_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    assert isinstance(module, nn.modules.instancenorm._InstanceNorm)
    if module.training or not module.track_running_stats:
        # Each example normalised by its own statistics; running statistics, if any, only track them.
        def normalize(x: Tensor, rows: slice) -> Tensor:
            return F.instance_norm(x, eps=module.eps)  # [n, C, *spatial]
    else:  # eval with tracked statistics: constants of the model, as torch uses them
        assert module.running_mean is not None and module.running_var is not None  # track_running_stats=True
        mean, var = module.running_mean.float(), module.running_var.float()

        def normalize(x: Tensor, rows: slice) -> Tensor:
            return F.instance_norm(x, mean, var, use_input_stats=False, eps=module.eps)

    reduce_dims = tuple(range(2, activation.dim()))
    return _affine_contributions(module, activation, grad_output, normalize, reduce_dims, params)


__all__ = ["forward_statistics", "group_norm_rule", "instance_norm_rule", "layer_norm_rule", "rms_norm_rule"]
