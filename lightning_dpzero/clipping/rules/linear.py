"""``nn.Linear`` with any number of leading dimensions: G_i = sum_t b_t a_t^T, bias sum_t b_t."""

from __future__ import annotations

from collections.abc import Mapping
from typing import cast

from torch import Tensor, nn

from lightning_dpzero.clipping.contributions import Contribution, Kind, full_shape
from lightning_dpzero.clipping.registry import register_rule, register_rule_by_name


def _positions(x: Tensor) -> Tensor:
    """[n, *, F] -> [n, T, F] (no dispatch where it is 3-d already)."""
    return x if x.dim() == 3 else x.reshape(x.shape[0], -1, x.shape[-1])


@register_rule(nn.Linear)
def linear_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    linear = cast(nn.Linear, module)  # registered for nn.Linear only
    b = _positions(grad_output)  # [n, T, P]: T = all dims between examples and features
    out = []
    if "weight" in params:
        a = _positions(activation)  # [n, T, D]
        out.append(Contribution(params["weight"], Kind.DENSE, b, a, full_shape(linear.weight)))
    if "bias" in params:
        out.append(Contribution(params["bias"], Kind.SAMPLE, b.sum(1), None, full_shape(linear.bias)))
    return out


@register_rule_by_name("transformers.pytorch_utils.Conv1D")
def conv1d_transposed_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str]
) -> list[Contribution]:
    """Hugging Face's GPT-2 ``Conv1D``: a Linear whose weight is stored transposed, [in, out] (y = x W + b)."""
    b = _positions(grad_output)  # [n, T, out]
    out = []
    if "weight" in params:
        a = _positions(activation)  # [n, T, in]
        shape = full_shape(cast(Tensor, module.weight))  # [in, out]
        out.append(Contribution(params["weight"], Kind.DENSE, b, a, shape, to_param=_transpose))
    if "bias" in params:
        out.append(Contribution(params["bias"], Kind.SAMPLE, b.sum(1), None, full_shape(cast(Tensor, module.bias))))
    return out


def _transpose(matrix: Tensor) -> Tensor:
    return matrix.transpose(0, 1)
