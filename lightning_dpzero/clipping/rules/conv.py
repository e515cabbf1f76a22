"""``nn.Conv1d/2d/3d`` (any stride, padding and padding mode, dilation, groups): unfold the input into
T = prod(output spatial) positions of C_in/groups * prod(kernel) features; then it is a Linear per group."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn import grad as conv_grad

from lightning_dpzero._internals.torch import ConvNd, conv_padding
from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import UnsupportedLayerError, register_rule


def _unfold(module: ConvNd, x: Tensor) -> Tensor:
    """x [n, C, *S] -> patches [n, T, C * prod(kernel)], features ordered (C, k1, k2, ...) like the weight.

    1-d and 2-d: torch's im2col (``F.unfold``, [n, C * prod(k), T]), returned transposed as a view: the matmuls that
    consume it read it in place (2-3x faster than gathering a permuted view). 3-d: strided windows, permuted.
    """
    pad = conv_padding(module)  # F.pad's spec, also set for padding='same'
    dims = len(module.kernel_size)
    if dims <= 2:
        numeric = module.padding_mode == "zeros" and not isinstance(module.padding, str)
        if any(pad) and not numeric:
            x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
        padding = cast(tuple[int, ...], module.padding) if numeric else (0,) * dims
        if dims == 1:  # as a 2-d convolution over [n, C, 1, L]
            x, one = x.unsqueeze(2), (1,)
            kernel, dilation, stride, padding = (
                one + tuple(module.kernel_size), one + tuple(module.dilation), one + tuple(module.stride),
                (0, *padding),
            )  # fmt: skip
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        return F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride).transpose(1, 2)
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel dim of size k
    n, c = x.shape[:2]
    out_spatial = x.shape[2 : 2 + dims]
    # [n, C, *O, *k] -> [n, *O, C, *k] -> [n, T, C * prod(k)]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return x.permute(order).reshape(n, math.prod(out_spatial), -1)


def _check(module: nn.Module, path: str) -> None:
    if module.transposed:  # pragma: no cover - ConvTranspose has its own types, kept for subclass safety
        raise UnsupportedLayerError(path, module, "transposed convolutions have no rule yet")


_WEIGHT_GRADIENTS = (conv_grad.conv1d_weight, conv_grad.conv2d_weight, conv_grad.conv3d_weight)


def _padded(module: ConvNd, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
    """x padded as the module pads it (padding modes, 'same'), and the numeric padding left for the convolution."""
    dims = len(module.kernel_size)
    pad = conv_padding(module)
    numeric = module.padding_mode == "zeros" and not isinstance(module.padding, str)
    if any(pad) and not numeric:
        x = F.pad(x, pad, mode="constant" if module.padding_mode == "zeros" else module.padding_mode)
    return x, cast(tuple[int, ...], module.padding) if numeric else (0,) * dims


def _weighted_weight_gradient(module: ConvNd, x: Tensor, grad_output: Tensor, factors: Tensor) -> Tensor:
    """sum_i f_i G_i, [C_out, C_in / groups * prod(kernel)] fp32: the batch's weight gradient with example i's output
    gradient scaled by f_i, by the weight-gradient convolution non-private training runs (no patches)."""
    x, padding = _padded(module, x.float())
    scaled = grad_output.float() * factors.view(-1, *([1] * (grad_output.dim() - 1)))
    weight_gradient = _WEIGHT_GRADIENTS[len(module.kernel_size) - 1](
        x, full_shape(module.weight), scaled, stride=module.stride, padding=padding, dilation=module.dilation,
        groups=module.groups,
    )  # fmt: skip
    return weight_gradient.reshape(weight_gradient.shape[0], -1)


def _per_example_weight_gradients(module: ConvNd, x: Tensor, grad_output: Tensor) -> Tensor:
    """[n, C_out, C_in / groups * prod(kernel)]: every example's weight gradient, by one weight-gradient convolution of
    the whole batch laid side by side as n * groups groups ([1, n * C_in, *S]). Where the output has many positions
    next to the weight's size (2 T^2 >= P D), this is 2-3x faster on CPU than im2col and a batched matmul, and it
    builds no patches. fp32, or bf16 where the output gradient is bf16 (the precision of the layer's own weight
    gradient under bf16 autocast; the engine takes the norms and the clipped sum from these stored values in fp32)."""
    n = x.shape[0]
    dtype = torch.bfloat16 if grad_output.dtype == torch.bfloat16 else torch.float32
    x, padding = _padded(module, x.to(dtype))
    grad_output = grad_output.to(dtype)
    c_in, c_out = x.shape[1], grad_output.shape[1]
    size = (n * c_out, c_in // module.groups, *module.kernel_size)
    weight_gradient = _WEIGHT_GRADIENTS[len(module.kernel_size) - 1](
        x.reshape(1, n * c_in, *x.shape[2:]),
        size,
        grad_output.reshape(1, n * c_out, *grad_output.shape[2:]),
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=n * module.groups,
    )
    return weight_gradient.reshape(n, c_out, -1)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, check=_check)
def conv_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    conv = cast(ConvNd, module)  # registered for nn.Conv1d/2d/3d only
    n, c_out = grad_output.shape[:2]
    if activation.dim() != len(conv.kernel_size) + 2:
        raise UnsupportedLayerError("", conv, "inputs without an example dimension are not supported")
    b = grad_output.reshape(n, c_out, -1).transpose(1, 2)  # [n, T, C_out]
    out = []
    if "weight" in params:
        groups, t = conv.groups, b.shape[1]
        p, d = c_out // groups, (activation.shape[1] // groups) * math.prod(conv.kernel_size)
        block = torch.Size((p, *full_shape(conv.weight)[1:]))
        patches = functools.cache(lambda: _unfold(conv, activation))  # [n, T, C_in * prod(k)], built on demand
        grouped = 2 * t * t >= p * d  # where the per-example weight-gradient convolution beats im2col (above)
        per_example = functools.cache(lambda: _per_example_weight_gradients(conv, activation, grad_output))

        def right(g: int) -> Callable[[], Tensor]:
            if groups == 1:  # not cached: the patches are dropped once the norm is taken (Contribution.spare)
                return lambda: _unfold(conv, activation)
            return lambda: patches()[..., g * d : (g + 1) * d]

        def instantiate(g: int) -> Callable[[], Tensor]:
            return lambda: per_example()[:, g * p : (g + 1) * p]

        for g in range(groups):
            rows = slice(g * p, (g + 1) * p) if groups > 1 else None
            out.append(
                Contribution(
                    params["weight"],
                    Kind.DENSE,
                    b[..., g * p : (g + 1) * p],
                    None,
                    full_shape(conv.weight) if rows is None else block,
                    rows=rows,
                    build_right=right(g),
                    instantiate=instantiate(g) if grouped else None,
                    dims=(t, p, d),
                    weighted_sum=(
                        functools.partial(_weighted_weight_gradient, conv, activation, grad_output)
                        if groups == 1
                        else None
                    ),
                )
            )
    if "bias" in params:
        assert conv.bias is not None  # "bias" is one of its trainable parameters
        out.append(Contribution(params["bias"], Kind.SAMPLE, b.sum(1), None, full_shape(conv.bias)))
    return out
