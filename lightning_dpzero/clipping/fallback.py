"""Per-example gradients with ``torch.func`` for trainable modules that have no rule (custom norms such as
``LlamaRMSNorm``, modules that own raw parameters such as ``ViTEmbeddings``' class token and position embeddings,
subclasses that change ``forward``).

For one call of ``module`` on inputs whose dim 0 is the n examples, with output gradient B [n, ...], example i's
gradient with respect to the module's *own* parameters theta is grad_theta <module(theta, inputs_i), B_i>, computed
for every i at once with ``vmap(grad(...))``. Submodules keep their own rules: their parameters are constants here.
This instantiates per-example gradients ([n, *param.shape] per own parameter) and re-runs the module's forward in the
backward pass, so it costs more than a rule; the parameters such modules own directly are usually small.

Inputs whose examples the engine followed to another dim (a sequence-first ``nn.MultiheadAttention``'s [L, n, E]) are
split along that dim. A module that draws random numbers in its training forward (attention dropout) is recomputed
with the generators reset to their state before that forward, under ``randomness="different"``; the recomputed
output must equal the forward's, or the module is refused.
"""

from __future__ import annotations

import contextlib
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpzero._internals import deepspeed as deepspeed_internals
from lightning_dpzero._internals.torch import hooks_set_aside
from lightning_dpzero.clipping.contributions import Contribution, Kind

__all__ = ["RandomState", "RandomnessNotReplayed", "functorch_rule", "may_draw_random_numbers"]


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
    shared = call is not None and call.shared  # no input holds example data: only the output gradient is split
    layout = call.layout if call is not None else None
    arg_dims = layout.args if layout is not None else ()
    kwarg_dims = dict(layout.kwargs) if layout is not None else {}
    out_dim = layout.dim if layout is not None else 0

    def split_dim(value: Any, dim: int | None, shared_input: bool = False) -> int | None:
        """The dim of an input that holds the n examples (None: the input is passed whole to every example)."""
        if shared or not isinstance(value, Tensor) or value.dim() == 0:
            return None
        if dim is not None:  # the examples moved out of dim 0 (sequence-first), as the watch followed them
            return dim
        return 0 if value.shape[0] == n and not shared_input else None

    per_example = [split_dim(a, arg_dims[i] if i < len(arg_dims) else None) for i, a in enumerate(args)]
    keyed = {k: d for k, v in kwargs.items() if (d := split_dim(v, kwarg_dims.get(k), _shared_input(module, k, v)))
             is not None}  # fmt: skip
    # Each split input with its examples moved to dim 0 for vmap; the call puts a dim of 1 back where they were.
    split_args = tuple(a.movedim(d, 0) for a, d in zip(args, per_example) if d is not None)
    split_kwargs = {k: kwargs[k].movedim(d, 0) for k, d in keyed.items()}

    def weighted_output(
        theta: dict[str, Tensor], xs: tuple[Tensor, ...], kws: dict[str, Tensor], b: Tensor
    ) -> tuple[Tensor, Tensor]:
        """<y_i, b_i>, and y_i (the aux output)."""
        rows = iter(xs)
        call_args = tuple(a if d is None else next(rows).unsqueeze(d) for a, d in zip(args, per_example))
        call_kwargs = {**kwargs, **{k: v.unsqueeze(keyed[k]) for k, v in kws.items()}}
        y = torch.func.functional_call(wrapper, theta, call_args, call_kwargs, strict=False)
        if isinstance(y, tuple):  # (output, values without gradient): the engine tapped the first item only
            y = y[0]
        return (y * (b if shared else b.unsqueeze(out_dim))).sum(), y.detach()

    def per_example_grads(randomness: str) -> tuple[dict[str, Tensor], Tensor]:
        with warnings.catch_warnings():
            # torch.func runs ops without a batching rule (e.g. CPU attention's backward) one example at a time, and
            # warns on every call; that cost is the fallback's, documented above, and nothing a user can act on.
            warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
            transform = torch.func.grad(weighted_output, has_aux=True)
            return torch.func.vmap(transform, in_dims=(None, 0, 0, 0), randomness=randomness)(
                own, split_args, split_kwargs, grad_output
            )

    random = call is not None and call.random is not None
    if random and _draws_random_numbers.get(module, False):
        grads = _replayed(module, call, per_example_grads)
    else:
        try:
            grads, _ = per_example_grads("error")
            if random:  # a training forward that drew nothing: later ones need not keep their output
                _draws_random_numbers[module] = False
        except RuntimeError as err:
            if not random or "randomness" not in str(err):
                raise
            _draws_random_numbers[module] = True
            grads = _replayed(module, call, per_example_grads)
    return [
        Contribution(params[attr], Kind.SAMPLE, grads[f"inner.{attr}"], None, own[f"inner.{attr}"].shape)
        for attr in params
    ]


# Whether a module drew random numbers in its last recomputed training forward (dropout): if so its recompute replays
# the forward's draws; if not, its forwards need not keep their output to check a replay against.
_draws_random_numbers: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def may_draw_random_numbers(module: nn.Module) -> bool:
    """Whether ``module``'s forward should keep its output for a replay: it drew random numbers, or is not seen yet."""
    return _draws_random_numbers.get(module, True)


@dataclass(eq=False)
class RandomState:
    """The generators' state just before a module's forward: its dropout masks, drawn again in the recompute."""

    cpu: Tensor
    device: torch.device | None  # the CUDA device whose generator the forward may draw from
    accelerator: Tensor | None

    @classmethod
    def capture(cls, device: torch.device) -> RandomState:
        cuda = device if device.type == "cuda" else None
        return cls(torch.get_rng_state(), cuda, torch.cuda.get_rng_state(cuda) if cuda is not None else None)


def _replayed(module: nn.Module, call: Any, per_example_grads: Callable[[str], tuple[Any, Tensor]]) -> Any:
    """Per-example gradients with the forward's random draws replayed: the generators reset to their state before
    the forward, and torch.func's ``randomness="different"``, which draws one batch-shaped tensor as the batched
    forward did. Whether the draws matched is checked, not assumed: the recomputed output must be the forward's."""
    state: RandomState = call.random
    with torch.random.fork_rng(devices=[state.device] if state.device is not None else []):
        torch.set_rng_state(state.cpu)
        if state.device is not None and state.accelerator is not None:
            torch.cuda.set_rng_state(state.accelerator, state.device)
        grads, recomputed = per_example_grads("different")
    if call.output is None:
        raise RandomnessNotReplayed(
            "its forward drew random numbers where an earlier one of the run drew none, so its output was not kept "
            "to check a replay against"
        )
    output = call.output.movedim(call.layout.dim, 0)
    recomputed = recomputed.reshape(output.shape)
    tolerance = 1e-4 if output.dtype in (torch.float32, torch.float64) else 2e-2
    scale = float(output.abs().max()) if output.numel() else 0.0
    if not torch.allclose(recomputed, output, rtol=tolerance, atol=tolerance * scale):
        raise RandomnessNotReplayed(
            f"the recomputed output differs from the forward's (max |difference| "
            f"{float((recomputed - output).abs().max()):.3g}): its random draws could not be replayed"
        )
    return grads


class RandomnessNotReplayed(RuntimeError):
    """A fallback module's random draws (dropout) could not be reproduced in its per-example recompute."""


def _shared_input(module: nn.Module, name: str, value: Tensor) -> bool:
    """A keyword input that is one tensor for every example even when its dim 0 happens to be n: an
    ``nn.MultiheadAttention``'s 2-d ``attn_mask`` [L, S] (with L = n it would otherwise be cut into rows)."""
    return isinstance(module, nn.MultiheadAttention) and name == "attn_mask" and getattr(value, "ndim", 0) == 2


class _Forward(nn.Module):
    """Calls ``inner.forward`` directly: the module's own hooks (ours; ZeRO-3's or FSDP2's gathering, already done
    for the backward that is running) must not run again inside torch.func's transforms."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner.forward(*args, **kwargs)
