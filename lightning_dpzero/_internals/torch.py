"""torch internals: DTensor's local storage and shard offsets, the renamed single-tensor collectives, compiled
modules, the convolution modules' padding spec, modules' hook tables, the statistics native layer and group norm
save for their backward, native group norm's backward kernel, and whether saved-tensor hooks are active (torch
2.13)."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd as ConvNd  # the base of Conv1d/2d/3d (and their transposes)

__all__ = [
    "PROBES",
    "ConvNd",
    "all_gather",
    "compiled_modules",
    "conv_padding",
    "dtensor_local",
    "group_norm_affine_gradients",
    "hooks_set_aside",
    "local_shape_and_offset",
    "native_norm_statistics",
    "reduce_scatter",
    "saved_tensor_hooks_active",
]


def dtensor_local(param: Tensor) -> Tensor | None:
    """The local shard of an FSDP2 (DTensor) parameter, writable in place; None for an ordinary tensor.

    ``to_local()`` may return an autograd alias; ``_local_tensor`` is the storage FSDP2 gathers from.
    """
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return None
    return param._local_tensor


def local_shape_and_offset(param: Any) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shape of this rank's shard of a DTensor and the global index of its first element."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


def reduce_scatter(output: Tensor, input: Tensor) -> None:
    """Sum ``input`` over the ranks and keep this rank's equal piece in ``output`` (torch 2.13 renamed
    ``reduce_scatter_tensor``, now a deprecated alias, to ``reduce_scatter_single``)."""
    collective = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    collective(output, input, op=dist.ReduceOp.SUM)


def all_gather(output: Tensor, input: Tensor) -> None:
    """Every rank's ``input`` side by side in ``output`` (``all_gather_into_tensor``, renamed likewise)."""
    collective = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    collective(output, input)


def compiled_modules(module: nn.Module) -> list[str]:
    """Paths of modules compiled with ``torch.compile`` (Lightning unwraps a compiled LightningModule, keeping a
    ``_compiler_ctx``; ``nn.Module.compile()`` sets ``_compiled_call_impl``; ``torch.compile(sub)`` wraps it)."""
    from torch._dynamo.eval_frame import OptimizedModule

    found = ["<LightningModule>"] if getattr(module, "_compiler_ctx", None) else []
    for path, sub in module.named_modules():
        if isinstance(sub, OptimizedModule) or getattr(sub, "_compiled_call_impl", None) is not None:
            found.append(path or "<LightningModule>")
    return found


def saved_tensor_hooks_active() -> bool:
    """Whether tensors saved for backward now go through pack/unpack hooks (non-reentrant activation checkpointing,
    CPU offload of activations): reading an autograd node's saved tensor would then unpack (recompute) it."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


# The autograd node of a native layer or group norm's output, by kind; it saves (mean, rstd) as result1, result2.
_NATIVE_NORM_NODES = {"layer": "NativeLayerNormBackward0", "group": "NativeGroupNormBackward0"}


def native_norm_statistics(output: Tensor, kind: str) -> tuple[Tensor, Tensor] | None:
    """The (mean, rstd) that torch's native ``kind`` ("layer" or "group") norm saved for the backward of ``output``,
    detached; ``None`` where ``output`` is another op's, or saved tensors go through pack hooks (reading one would
    unpack, i.e. recompute, it)."""
    node = output.grad_fn
    if type(node).__name__ != _NATIVE_NORM_NODES[kind] or saved_tensor_hooks_active():
        return None
    return node._saved_result1.detach(), node._saved_result2.detach()  # type: ignore[union-attr]


def group_norm_affine_gradients(
    grad: Tensor, x: Tensor, mean: Tensor, rstd: Tensor, groups: int
) -> tuple[Tensor, Tensor]:
    """Every example's group-norm weight and bias gradients, [n, C] each: sum over positions of grad * x_hat and of
    grad, by torch's own backward kernel (one fused pass), with the batch laid side by side as one example of n C
    channels in n ``groups`` groups.

    Args:
        grad, x: [n, C, *spatial], contiguous, of the statistics' dtype.
        mean, rstd: [n, groups], as the forward saved them (``native_norm_statistics``).
    """
    n, c = x.shape[:2]
    positions = x[0, 0].numel() if n and c else 0
    _, weight, bias = torch.ops.aten.native_group_norm_backward(
        grad.reshape(1, n * c, positions),
        x.reshape(1, n * c, positions),
        mean.reshape(1, n * groups),
        rstd.reshape(1, n * groups),
        x.new_ones(n * c),
        1,
        n * c,
        positions,
        n * groups,
        [False, True, True],
    )  # fmt: skip  (the weight scales only the input gradient, not asked for; the kernel needs one for its device)
    return weight.view(n, c), bias.view(n, c)


def conv_padding(module: nn.Module) -> list[int]:
    """A convolution's padding as ``F.pad`` takes it (also set for ``padding='same'``)."""
    return list(module._reversed_padding_repeated_twice)  # type: ignore[arg-type]


# nn.Module's per-module hook tables (hook id -> hook), as Module.__call__ reads them; their flag tables
# (_forward_hooks_with_kwargs, ...) are looked up by the ids found here, so they need no change
_HOOK_TABLES = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")


def _defined_in(hook: Any) -> str:
    fn = getattr(hook, "func", hook)  # functools.partial
    return getattr(getattr(fn, "__func__", fn), "__module__", None) or ""


@contextlib.contextmanager
def hooks_set_aside(modules: Iterable[nn.Module], *, library: str) -> Iterator[None]:
    """Inside the block, calls of ``modules`` run without the hooks that the package ``library`` registered on them
    (e.g. ZeRO-3's parameter fetch and release: ``library="deepspeed"``); every other hook still runs. They are put
    back after."""
    saved = []
    for m in modules:
        for name in _HOOK_TABLES:
            table = getattr(m, name)
            theirs = {k for k, hook in table.items() if _defined_in(hook).split(".")[0] == library}
            if theirs:
                saved.append((m, name, table))
                setattr(m, name, OrderedDict((k, hook) for k, hook in table.items() if k not in theirs))
    try:
        yield
    finally:
        for m, name, table in saved:
            setattr(m, name, table)


def _probe_hook_tables() -> None:
    module, calls = nn.Linear(2, 2), []

    def theirs(*_: Any) -> None:
        calls.append("theirs")

    theirs.__module__ = "somelib.hooks"
    module.register_forward_pre_hook(theirs)
    module.register_forward_pre_hook(lambda *_: calls.append("pre"))
    module.register_forward_hook(lambda *_: calls.append("post"), with_kwargs=True, always_call=True)
    with hooks_set_aside([module], library="somelib"):
        module(torch.zeros(1, 2))
    assert calls == ["pre", "post"], f"set aside: only somelib's hook; ran {calls}"
    module(torch.zeros(1, 2))
    assert calls == ["pre", "post", "theirs", "pre", "post"], calls


def _probe_compiled() -> None:
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    b.compile()
    holder = nn.Sequential(a, b)
    assert compiled_modules(holder) == ["1"], compiled_modules(holder)


def _probe_conv_padding() -> None:
    assert conv_padding(nn.Conv2d(1, 1, (3, 5), padding="same")) == [2, 2, 1, 1]


def _probe_dtensor() -> None:
    """A one-rank gloo group: a DTensor sharded on a one-device mesh, its local storage and offsets."""
    import tempfile

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    started = not dist.is_initialized()
    if started:
        with tempfile.NamedTemporaryFile() as store:
            dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = distribute_tensor(torch.arange(6.0).view(3, 2), mesh, [Shard(0)])
        local = dtensor_local(param)
        assert local is not None and local.shape == (3, 2) and local.data_ptr() == param.to_local().data_ptr()
        assert local_shape_and_offset(param) == ((3, 2), (0, 0))
        assert dtensor_local(torch.zeros(1)) is None
    finally:
        if started:
            dist.destroy_process_group()


def _probe_collectives() -> None:
    assert callable(getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)
    assert callable(getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)


def _probe_norm_statistics() -> None:
    x = torch.randn(2, 3, 4, requires_grad=True)
    stats = native_norm_statistics(F.layer_norm(x, (4,)), "layer")
    assert stats is not None
    torch.testing.assert_close(stats[0], x.detach().mean(-1, keepdim=True))
    torch.testing.assert_close(stats[1], (x.detach().var(-1, unbiased=False, keepdim=True) + 1e-5).rsqrt())
    y = torch.randn(2, 4, 3, requires_grad=True)
    stats = native_norm_statistics(F.group_norm(y, 2), "group")
    assert stats is not None
    torch.testing.assert_close(stats[0], y.detach().reshape(2, 2, 6).mean(-1))
    assert native_norm_statistics(F.layer_norm(x, (4,)), "group") is None
    assert not saved_tensor_hooks_active()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert saved_tensor_hooks_active()
        assert native_norm_statistics(F.layer_norm(x, (4,)), "layer") is None


def _probe_group_norm_backward() -> None:
    x = torch.randn(3, 4, 5, 2, dtype=torch.float64, requires_grad=True)
    out = F.group_norm(x, 2)
    stats = native_norm_statistics(out, "group")
    assert stats is not None
    grad = torch.randn_like(out)
    weight, bias = group_norm_affine_gradients(grad, x.detach(), *stats, groups=2)
    x_hat = F.group_norm(x.detach(), 2)
    torch.testing.assert_close(weight, (grad * x_hat).sum((2, 3)))
    torch.testing.assert_close(bias, grad.sum((2, 3)))


PROBES: dict[str, Callable[[], None]] = {
    "torch._dynamo OptimizedModule / nn.Module._compiled_call_impl": _probe_compiled,
    "nn.modules.conv._ConvNd._reversed_padding_repeated_twice": _probe_conv_padding,
    "DTensor._local_tensor / tensor._utils.compute_local_shape_and_global_offset": _probe_dtensor,
    "dist.reduce_scatter_single / all_gather_single": _probe_collectives,
    "nn.Module hook tables (_forward_hooks, _forward_pre_hooks, ...)": _probe_hook_tables,
    "Native{Layer,Group}NormBackward0._saved_result1/2, autograd._top_saved_tensors_default_hooks": (
        _probe_norm_statistics
    ),
    "aten.native_group_norm_backward (output_mask)": _probe_group_norm_backward,
}
