"""Outputs shared by every example: per-example gradients for a module called on inputs that hold no example data.

A module called once for the whole batch on something computed from shapes alone (positions ``wpe(arange(T))``
of shape [T, D]; T5's relative attention bias, an embedding of relative-position buckets [q, k] that gives
[q, k, heads], reused by every layer) has an output without an example dimension. Autograd hands its tap the sum
over the examples of their output gradients, from which no example's own gradient can be read.

What each example contributes is visible where the shared value meets the examples' data: a broadcasting op (``+``,
``*``, ``where``, ``matmul``, the ``attn_mask`` of ``scaled_dot_product_attention``) that stretches it over dim 0, the
example dimension. There, the watch (``watch.py``) expands the shared operand to the n examples (a view) and passes
it through a ``SharedTap``, so the op's backward leaves each example its own gradient G_i. The tap maps G_i back to
the module's output with the vector-Jacobian product of the data-free ops in between (a permute and an unsqueeze
for T5), for all examples at once (``is_grads_batched``), and the module's rule then sees an [n, ...] activation
(the input, expanded) and output gradient as for any other call. Each use reports separately: a bias reused by
several layers has several uses, whose cross terms the engine adds as for tied weights.

The watch tells data-free tensors (from a factory, a parameter or a buffer, or ops on those only) from those that
hold example data. A shared value combined with example data by any other
op (``cat``, an in-place write, a module call) would lose that use's gradient, so the run is refused, naming the op;
and a data-free value laundered through Python (``torch.tensor(x.tolist())``) is caught by the per-example
self-check, which compares every tap's rows when one example changes.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from lightning_dpzero.clipping.engine import ClippingEngine, TapRecord, _Call, _Layer

__all__ = ["SharedCall", "SharedTap", "SharedUse", "per_example_view"]


@dataclass(eq=False)
class SharedCall:
    """One call of a hooked module whose inputs hold no example data."""

    layer: _Layer
    activation: Tensor  # its input (detached), without an example dimension
    call: _Call | None  # all its inputs, for the torch.func fallback
    record: TapRecord | None  # its tap's record for the self-check, until a use shows it is shared
    output: weakref.ref[Tensor] | None = None  # its tapped output
    shared: bool = False  # some use broadcast it over the examples: the uses report, its own tap passes through
    escaped: str | None = None  # an op that combined it with example data without splitting it per example
    feeds: list[SharedCall] = field(default_factory=list)  # shared calls whose input it is


class SharedTap(torch.autograd.Function):
    """Identity on a shared value expanded to the n examples: hands each example's gradient, mapped back to each
    shared call's output, to the engine."""

    @staticmethod
    def forward(ctx: Any, expanded: Tensor, anchor: Tensor, engine: ClippingEngine, use: SharedUse) -> Tensor:
        ctx.engine, ctx.use = engine, use
        return expanded.view_as(expanded)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None]:
        engine, use = ctx.engine, ctx.use
        if engine._passive:  # the self-check's autograd reference
            return grad, None, None, None
        ctx.use = None
        n = grad.shape[0]
        per_example = grad.reshape(n, *use.value.shape)  # [n, *value.shape]: example i's gradient of this use
        if len(use.outputs) == 1 and use.outputs[0] is use.value:
            grads: tuple[Tensor | None, ...] = (per_example,)
        else:  # through the data-free ops between each call's output and this use, for every example at once
            grads = torch.autograd.grad(
                use.value, use.outputs, per_example, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        for shared, output, g, record in zip(use.calls, use.outputs, grads, use.records):
            if g is None:
                g = output.new_zeros(n, *output.shape)
            if record is not None:
                record.grad = g.detach()
            engine._receive(shared.layer, per_example_view(shared.activation, n), g, shared.call)
        return grad, None, None, None


@dataclass(eq=False)
class SharedUse:
    """One op that broadcast a data-free value over the examples: the value, the shared calls it derives from and
    their outputs (held until the backward), and the self-check's records of this use."""

    value: Tensor
    calls: tuple[SharedCall, ...]
    outputs: list[Tensor]
    records: list[TapRecord | None]


def per_example_view(t: Tensor, n: int) -> Tensor:
    """[*shape] -> [n, *shape], a view."""
    return t.unsqueeze(0).expand(n, *t.shape)
