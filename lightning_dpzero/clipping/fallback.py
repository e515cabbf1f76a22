"""Per-example gradients with ``torch.func`` for trainable modules that have no rule (custom norms such as
``LlamaRMSNorm``, modules that own raw parameters such as ``ViTEmbeddings``' class token and position embeddings,
subclasses that change ``forward``).

For one call of ``module`` on inputs whose dim 0 is the n examples, with output gradient B [n, ...], example i's
gradient with respect to the module's *own* parameters theta is grad_theta <module(theta, inputs_i), B_i>, computed
for every i at once with ``vmap(grad(...))``. Submodules keep their own rules: their parameters are constants here.
This instantiates per-example gradients ([n, *param.shape] per own parameter) and re-runs the module's forward in the
backward pass, so it costs more than a rule; the parameters such modules own directly are usually small.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpzero._internals import deepspeed as deepspeed_internals
from lightning_dpzero._internals.torch import hooks_set_aside
from lightning_dpzero.clipping.contributions import Contribution, Kind

__all__ = ["functorch_rule"]


def functorch_rule(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str], call: Any = None
) -> list[Contribution]:
    """Args as every ``ClippingRule``; ``call`` holds all positional and keyword inputs of the call (tensors whose
    dim 0 is the n examples are split per example, the others are shared)."""
    with _plain_subtree(module):
        return _per_example(module, activation, grad_output, params, call)


@contextlib.contextmanager
def _plain_subtree(module: nn.Module) -> Iterator[None]:
    """Under ZeRO-3, the recompute calls the submodules of ``module`` without DeepSpeed's hooks (its parameter fetch
    and release cannot run under vmap), and the subtree's parameters that this rank does not hold now are gathered
    for the block instead (a module's own are held during its backward). Otherwise nothing changes."""
    if not any(deepspeed_internals.is_partitioned(p) for p in module.parameters()):
        yield
        return
    away = deepspeed_internals.partitioned_away(module.parameters())
    gathered: contextlib.AbstractContextManager = contextlib.nullcontext()
    if away:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(away, modifier_rank=None)
    with gathered, hooks_set_aside((m for m in module.modules() if m is not module), library="deepspeed"):
        yield


def _per_example(
    module: nn.Module, activation: Tensor, grad_output: Tensor, params: Mapping[str, str], call: Any
) -> list[Contribution]:
    n = grad_output.shape[0]
    args, kwargs = (call.args, call.kwargs) if call is not None else ((activation,), {})
    wrapper = _Forward(module)
    own = {f"inner.{attr}": module.get_parameter(attr).detach() for attr in params}
    per_example = [isinstance(a, Tensor) and a.dim() > 0 and a.shape[0] == n for a in args]
    keyed = [
        k
        for k, v in kwargs.items()
        if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == n and not _shared_input(module, k, v)
    ]
    split_args = tuple(a for a, split in zip(args, per_example) if split)
    split_kwargs = {k: kwargs[k] for k in keyed}

    def weighted_output(theta: dict[str, Tensor], xs: tuple[Tensor, ...], kws: dict[str, Tensor], b: Tensor) -> Tensor:
        rows = iter(xs)
        call_args = tuple(next(rows).unsqueeze(0) if split else a for a, split in zip(args, per_example))
        call_kwargs = {**kwargs, **{k: v.unsqueeze(0) for k, v in kws.items()}}
        y = torch.func.functional_call(wrapper, theta, call_args, call_kwargs, strict=False)
        if isinstance(y, tuple):  # (output, values without gradient): the engine tapped the first item only
            y = y[0]
        return (y * b.unsqueeze(0)).sum()

    with warnings.catch_warnings():
        # torch.func runs ops without a batching rule (e.g. CPU attention's backward) one example at a time, and warns
        # on every call; that cost is the fallback's, documented above, and nothing a user can act on.
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet implemented")
        grads = torch.func.vmap(torch.func.grad(weighted_output), in_dims=(None, 0, 0, 0))(
            own, split_args, split_kwargs, grad_output
        )
    return [
        Contribution(params[attr], Kind.SAMPLE, grads[f"inner.{attr}"], None, own[f"inner.{attr}"].shape)
        for attr in params
    ]


def _shared_input(module: nn.Module, name: str, value: Tensor) -> bool:
    """A keyword input that is one tensor for every example even when its dim 0 happens to be n: an
    ``nn.MultiheadAttention``'s 2-d ``attn_mask`` [L, S] (with L = n it would otherwise be cut into rows)."""
    return isinstance(module, nn.MultiheadAttention) and name == "attn_mask" and value.dim() == 2


class _Forward(nn.Module):
    """Calls ``inner.forward`` directly: the module's own hooks (ours; ZeRO-3's or FSDP2's gathering, already done
    for the backward that is running) must not run again inside torch.func's transforms."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)
