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


def _windows(module: ConvNd, x: Tensor) -> Tensor:
    """x [n, C, *S] -> patches [n, T, groups * prod(kernel) * C / groups]: the input window of each of the T output
    positions, its features ordered (group, kernel position, channel of the group).

    The input is laid out channels last first, so that each window is copied as runs of contiguous channels: on CPU
    about 2x faster than im2col (``F.unfold``), whose (channel, kernel position) order gathers one value at a time.
    A matrix formed from these patches is [P, prod(kernel) * C / groups]; ``_to_weight`` turns it into the weight's
    (channel, kernel position) layout.
    """
    x, padding = _padded(module, x)
    x = x.movedim(1, -1)  # [n, *S, C], a view
    if any(padding):  # the zero padding and the channels-last layout in one copy
        x = F.pad(x, [0, 0, *(side for size in reversed(padding) for side in (size, size))])
    x = x.contiguous()  # the strides below assume it (a no-op after the padding)
    dims = len(module.kernel_size)
    n, spatial, channels = x.shape[0], x.shape[1:-1], x.shape[-1]
    per_group = channels // module.groups
    out = _output_size(module, spatial)
    stride = x.stride()
    windows = x.as_strided(
        (n, *out, module.groups, *module.kernel_size, per_group),
        (
            stride[0], *(stride[1 + i] * module.stride[i] for i in range(dims)), per_group,
            *(stride[1 + i] * module.dilation[i] for i in range(dims)), 1,
        ),
    )  # fmt: skip
    return windows.reshape(n, math.prod(out), -1)


def _kernel_major(module: ConvNd, x: Tensor) -> Tensor:
    """x [n, C, *S] -> windows [n, C * prod(kernel), T]: the input window of each of the T output positions, its
    features in the weight's own (channel, kernel position) order, the positions last.

    Each (channel, kernel position) row is copied as runs along the last spatial dim, where ``_windows`` copies runs
    of C channels: with few channels (an RGB input layer) several times faster (docs/benchmarks.md), and no
    reordering to the weight's layout after.
    """
    x, padding = _padded(module, x)
    if any(padding):
        x = F.pad(x, [side for size in reversed(padding) for side in (size, size)])
    x = x.contiguous()
    dims = len(module.kernel_size)
    n, channels, spatial = x.shape[0], x.shape[1], x.shape[2:]
    out = _output_size(module, spatial)
    stride = x.stride()
    windows = x.as_strided(
        (n, channels, *module.kernel_size, *out),
        (
            stride[0], stride[1], *(stride[2 + i] * module.dilation[i] for i in range(dims)),
            *(stride[2 + i] * module.stride[i] for i in range(dims)),
        ),
    )  # fmt: skip
    return windows.reshape(n, channels * math.prod(module.kernel_size), math.prod(out))


def _output_size(module: ConvNd, padded: torch.Size) -> list[int]:
    """The output's spatial size, from the padded input's."""
    return [
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(padded, module.kernel_size, module.stride, module.dilation)
    ]


@functools.cache
def _to_weight(kernel: tuple[int, ...], per_group: int) -> Callable[[Tensor], Tensor]:
    """[P, prod(kernel) * C / groups] in the patches' (kernel position, channel) order -> the weight's block
    [P, C / groups, *kernel]. One function per layout, so that ``inner`` can tell two uses laid out alike."""

    def to_weight(matrix: Tensor) -> Tensor:
        return matrix.reshape(matrix.shape[0], *kernel, per_group).movedim(-1, 1).contiguous()

    return to_weight


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
    """sum_i f_i G_i, the weight's shape, fp32: the batch's weight gradient with example i's output gradient scaled
    by f_i, by the weight-gradient convolution non-private training runs (no patches)."""
    x, padding = _padded(module, x.float())
    scaled = grad_output.float() * factors.view(-1, *([1] * (grad_output.dim() - 1)))
    return _WEIGHT_GRADIENTS[len(module.kernel_size) - 1](
        x, full_shape(module.weight), scaled, stride=module.stride, padding=padding, dilation=module.dilation,
        groups=module.groups,
    )  # fmt: skip


def _per_example_weight_gradients(module: ConvNd, x: Tensor, grad_output: Tensor) -> Tensor:
    """[n, C_out, C_in / groups * prod(kernel)] in the weight's own order: every example's weight gradient, by one
    weight-gradient convolution of the whole batch laid side by side as n * groups groups ([1, n * C_in, *S]).
    ``_grouped_is_faster`` says where this beats the patches and a batched matmul. fp32, or bf16 where the output
    gradient is bf16 (the precision of the layer's own weight gradient under bf16 autocast; the engine takes the norms
    and the clipped sum from these stored values in fp32)."""
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


def _grouped_is_faster(positions: int, per_group: int) -> bool:
    """Whether the per-example weight-gradient convolution is the faster way to a layer's per-example gradients
    than its patches and a batched matmul (measured on CPU, docs/benchmarks.md): with many output positions and
    enough input channels per group. With few channels (an RGB input layer) the grouped convolution runs n * groups
    tiny convolutions; with few positions (the deep layers of a CNN) a few large matmuls win."""
    return positions >= 256 and per_group >= 8


def _kernel_major_is_faster(per_group: int) -> bool:
    """Whether a layer's per-example gradients, where the grouped convolution is not the faster way, are made from its
    kernel-major windows (``_kernel_major``) rather than its channels-last patches (``_windows``): with few input
    channels per group, whose channels-last runs are short (measured on CPU, docs/benchmarks.md)."""
    return per_group < 16


def _kernel_major_gradients(module: ConvNd, x: Tensor, grads: Tensor) -> Tensor:
    """[n, P, C_in / groups * prod(kernel)], the weight's own order: every example's weight gradient (of one group's
    P output channels), from the kernel-major windows of its input x [n, C_in / groups, *S] and its output gradient
    ``grads`` [n, T, P] by one batched matmul. The matmul forms the transposed block ([n, D, P]: the faster order on
    CPU where D is small) and copies it into the weight's order. bf16 where the output gradient is bf16 (the layer's
    own weight gradient's precision under autocast), fp32 otherwise."""
    dtype = torch.bfloat16 if grads.dtype == torch.bfloat16 else torch.float32
    windows = _kernel_major(module, x.to(dtype))  # [n, D, T]
    return torch.bmm(windows, grads.to(dtype)).transpose(1, 2).contiguous()


def _grouped_rows_at_once(activation: Tensor, elements: int) -> int | None:
    """The examples whose per-example weight gradients one grouped convolution makes by default, from the elements
    of an example's input and block (``elements``): on CPU, as many as ``_GROUPED_BYTES`` of fp32 hold, which bounds
    the convolution's transient memory (``_grouped_transient``) and its slow cases (on a 2-core Xeon, with freed memory
    retained: a bf16 [32, 16, 64, 64] input took 20 ms at once, 10 ms by halves, 4.6 ms four examples at a time;
    batches of up to ~8 MB of fp32 ran at their fastest whole, 5-25% faster than by quarters); elsewhere the whole
    batch (``None``)."""
    if activation.device.type != "cpu":
        return None
    return max(1, _GROUPED_BYTES // (4 * max(1, elements)))


_GROUPED_BYTES = 1 << 23
_WINDOW_ELEMENTS = 1 << 24  # the most elements of kernel-major windows built at once (as of patches: _RIGHT_CHUNK)


def _grouped_transient(grad_output: Tensor, input_size: int) -> int:
    """Bytes per example that a per-example weight-gradient convolution allocates besides its block (measured on
    CPU, torch 2.13: about 2x the example's input in fp32, 3.3x in bf16, its copy in the compute dtype included)."""
    return input_size * (14 if grad_output.dtype == torch.bfloat16 else 8)


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
        kernel, per_group = tuple(conv.kernel_size), activation.shape[1] // groups
        p, d = c_out // groups, per_group * math.prod(kernel)
        block = torch.Size((p, *full_shape(conv.weight)[1:]))
        to_weight = _to_weight(kernel, per_group)
        patches = functools.cache(lambda: _windows(conv, activation))  # [n, T, C_in * prod(k)], built on demand
        # Instantiated by the grouped weight-gradient convolution where it is the faster way, else, with few channels
        # per group, from the kernel-major windows; otherwise by the contribution's batched matmul of its factors
        # (Contribution.choose_norm_mode).
        grouped = _grouped_is_faster(t, per_group)
        kernel_major = not grouped and _kernel_major_is_faster(per_group)
        per_example = functools.cache(lambda: _per_example_weight_gradients(conv, activation, grad_output))
        # One group: made a few examples at a time (its transient memory, and its speed); see _grouped_rows_at_once.
        chunked = grouped and groups == 1
        input_size = activation[0].numel() if n else 0
        rows_at_once, transient = None, 0  # how many examples' blocks are made at once; bytes made per example
        if kernel_major:  # the windows, and the transposed block
            rows_at_once = max(1, _WINDOW_ELEMENTS // max(1, t * d))
            transient = (t + p) * d * (2 if grad_output.dtype == torch.bfloat16 else 4)
        elif grouped:
            rows_at_once = _grouped_rows_at_once(activation, input_size + p * d) if chunked else None
            transient = _grouped_transient(grad_output, input_size)

        def right(g: int) -> Callable[..., Tensor]:
            if groups == 1:  # not cached: the patches are dropped once the norm is taken (Contribution.spare)
                return lambda rows=slice(None): _windows(conv, activation[rows])
            return lambda rows=slice(None): patches()[rows, :, g * d : (g + 1) * d]

        def instantiate(g: int) -> Callable[..., Tensor]:
            if kernel_major:  # a few examples at a time: their windows are T / P times the size of their blocks
                channels = slice(g * per_group, (g + 1) * per_group) if groups > 1 else slice(None)
                return lambda rows: _kernel_major_gradients(
                    conv, activation[rows, channels], b[rows, :, g * p : (g + 1) * p]
                )
            if chunked:
                return lambda rows: _per_example_weight_gradients(conv, activation[rows], grad_output[rows])
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
                    to_param=to_weight,
                    build_right=right(g),
                    instantiate=instantiate(g) if grouped or kernel_major else None,
                    instantiate_rows=rows_at_once,
                    instantiate_bytes=transient,
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
