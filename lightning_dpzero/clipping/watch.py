"""The recorded forward, op by op (a ``TorchFunctionMode``): which tensors hold example data, and in which dim.

A tensor is *data-free* when it comes from a factory (``arange``, ``zeros``), a parameter or a buffer, or an op on
data-free tensors only; a hooked module called on data-free inputs has an output shared by every example, split per
example where a broadcasting op meets the examples (``shared.py``). A tensor with example data has them in dim 0 when
it enters the forward (the batch is collated on dim 0), and the watch follows them: a view (transpose, permute,
unsqueeze) moves them to the one dim with their size and stride; an op that keeps the rank or broadcasts keeps them
in place, counted from the right; anything else loses them (the module is then taken as examples-first, which the
per-example self-check verifies). A sequence-first model (``[T, n, E]`` after a transpose) is followed to dim 1.

The watch runs on the first physical batch, which fixes each hooked module's layout for the batches after it, and on
every batch once a model has shown a shared output (T5); other models pay nothing after the first batch.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from lightning_dpzero.clipping.registry import UnsupportedLayerError
from lightning_dpzero.clipping.shared import SharedCall

if TYPE_CHECKING:
    from lightning_dpzero.clipping.engine import ClippingEngine, _Layer

__all__ = ["ForwardWatch"]


# Ops that broadcast their operands against each other (elementwise), in place or not.
_ELEMENTWISE = {
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.lerp, torch.addcmul, torch.maximum, torch.minimum,
    Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
    Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
    Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
    Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__,
    Tensor.masked_fill, Tensor.where,
}  # fmt: skip
_MATMUL = {torch.matmul, Tensor.matmul, Tensor.__matmul__, Tensor.__rmatmul__}
# Ops whose result another tapped output may not be broadcast into along a new leading dimension (first batch).
_BROADCASTING = _ELEMENTWISE | {Tensor.expand, Tensor.expand_as}


class ForwardWatch(TorchFunctionMode):
    """Watches the ops of one recorded forward pass (see the module docstring).

    Args:
        engine: the engine recording the batch (its ``share`` wraps a shared use).
        rows: n, the examples of the physical batch; ``None``: unknown, and nothing is split.
        constants: ids of the model's buffers (data-free, like its parameters).
        first: the first recorded batch: a tapped output with example data (or any, when ``rows`` is unknown)
            broadcast along a new leading dimension is refused (its dim 0 is not the example dimension).
    """

    def __init__(self, engine: ClippingEngine, rows: int | None, constants: set[int], first: bool) -> None:
        super().__init__()
        self.engine, self.rows, self.constants, self.first = engine, rows, constants, first
        # id -> (the tensor, the shared calls it derives from), for every data-free tensor seen
        self._free: dict[int, tuple[weakref.ref[Tensor], tuple[SharedCall, ...]]] = {}
        # id -> (the tensor, the dim of its examples): tensors with example data whose examples are not in dim 0
        # (-1: not known); any other tensor with example data has them in dim 0 (the batch is collated on dim 0)
        self._dims: dict[int, tuple[weakref.ref[Tensor], int]] = {}
        self._tapped: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()
        self._layers: dict[int, _Layer] = {}
        self.calls: list[SharedCall] = []
        self._held: list[Tensor] = []
        self.error: UnsupportedLayerError | None = None  # raised by ``finish``: Tensor dunders would turn an
        # exception raised inside the mode into NotImplemented

    # ------------------------------------------------------------------------------------------ bookkeeping
    def is_free(self, t: Tensor) -> bool:
        if isinstance(t, nn.Parameter) or id(t) in self.constants:
            return True
        entry = self._free.get(id(t))
        return entry is not None and entry[0]() is t

    def example_dim(self, t: Tensor) -> int | None:
        """The dim of ``t`` that holds the examples; ``None`` for data-free tensors and where the ops in between
        could not be followed."""
        if self.is_free(t):
            return None
        entry = self._dims.get(id(t))
        if entry is None or entry[0]() is not t:
            return 0
        return entry[1] if entry[1] >= 0 else None

    def _set_dim(self, t: Tensor, dim: int | None) -> None:
        if dim == 0:
            self._dims.pop(id(t), None)
        else:
            self._dims[id(t)] = (weakref.ref(t), -1 if dim is None else dim)

    def _from(self, t: Tensor) -> tuple[SharedCall, ...]:
        entry = self._free.get(id(t))
        return entry[1] if entry is not None and entry[0]() is t else ()

    def call_for(self, layer: _Layer, inputs: Any, output: Tensor, activation: Tensor) -> SharedCall | None:
        """The hooked call's ``SharedCall`` when neither its inputs (any nesting) nor its output, as the ops inside
        it were followed, hold example data; else ``None``."""
        if self.rows is None or not self.is_free(output):
            return None  # (with n unknown nothing can be split, and the first batch's refusal below applies)
        if not all(self.is_free(t) for t in _tensors(inputs)):
            return None
        shared = SharedCall(layer, activation, None, None)
        for t in _tensors(inputs):
            for inner in self._from(t):
                inner.feeds.append(shared)
        self.calls.append(shared)
        return shared

    def track(self, tapped: Tensor, layer: _Layer, shared: SharedCall | None, dim: int) -> None:
        """Called with a tap's output: data-free (and a source of shared uses) when its inputs were; otherwise its
        examples are in ``dim``, as in the module's input."""
        if shared is not None:  # (free to broadcast against other data-free values; split where it meets data)
            shared.output = weakref.ref(tapped)
            self._held.append(tapped)  # until the forward ends: a wrapper's hook (ZeRO-3's) may replace the output
            self._free[id(tapped)] = (weakref.ref(tapped), (shared,))
            return
        self._free.pop(id(tapped), None)
        self._set_dim(tapped, dim if dim < tapped.dim() else None)
        if self.first:
            self._tapped[id(tapped)] = tapped
            self._layers[id(tapped)] = layer

    def finish(self) -> None:
        """Raise what the forward showed: a refused broadcast, or a shared output also used in a way that cannot be
        split per example."""
        if self.error is not None:
            raise self.error
        for shared in self.calls:
            fed = next((outer for outer in shared.feeds if outer.shared), None)
            if fed is not None:
                raise UnsupportedLayerError(
                    shared.layer.path,
                    shared.layer.module,
                    "its output is computed from no example data and goes into module "
                    f"'{fed.layer.path}', also computed once for all examples, before it meets them; per-example "
                    "gradients cannot be split back through that module. Apply one of them to per-example inputs "
                    "(positions expanded per example: wpe(pos.expand(n, T))), or freeze it: "
                    f"get_submodule('{shared.layer.path}').requires_grad_(False)",
                )
            if shared.shared and shared.escaped is not None:
                raise UnsupportedLayerError(
                    shared.layer.path,
                    shared.layer.module,
                    "its output is computed from no example data and shared by all examples; per-example gradients "
                    "are read where a broadcasting op (+, *, where, matmul, scaled_dot_product_attention's "
                    f"attn_mask) stretches it over the examples, but `{shared.escaped}` also combines it with example "
                    "data, and that use's gradient could not be split. Combine it with the examples through a "
                    f"broadcasting op, or freeze it: get_submodule('{shared.layer.path}').requires_grad_(False)",
                )

    # -------------------------------------------------------------------------------------------------- ops
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        leaves = list(_tensors((args, kwargs)))
        carried = {id(t): calls for t in leaves if (calls := self._from(t))}
        free = all(self.is_free(t) for t in leaves)
        split: set[int] = set()
        if carried and self.rows is not None and not free:
            args, kwargs, split = self._split(func, args, kwargs, carried)
        out = func(*args, **kwargs)
        if carried and self.rows is not None and func in (Tensor.expand, Tensor.expand_as):
            value = args[0]
            if id(value) in carried and _over_examples(value, out.shape, self.rows):
                out = self.engine.share(value, carried[id(value)], out.dim()).expand(out.shape)
                split.add(id(value))
        outputs = list(_tensors(out))
        name = getattr(func, "__name__", "")
        if args and isinstance(args[0], Tensor) and (name.endswith("_") and not name.endswith("__") or
                                                     func is Tensor.__setitem__ or name.startswith("__i")):  # fmt: skip
            outputs.append(args[0])  # written in place
        if free and not split:
            sources = tuple(dict.fromkeys(c for calls in carried.values() for c in calls))
            for t in outputs:
                self._free[id(t)] = (weakref.ref(t), sources)
        else:
            source = next((t for t in leaves if not self.is_free(t)), None)
            dim = None if source is None else self.example_dim(source)
            for t in outputs:
                self._free.pop(id(t), None)
                if t is not source:
                    self._set_dim(t, None if dim is None or source is None else _moved(func, source, dim, t))
            if any(t.requires_grad for t in outputs):
                for key, calls in carried.items():
                    if key not in split:
                        for shared in calls:
                            shared.escaped = shared.escaped or name or repr(func)
        if self.first and func in _BROADCASTING and isinstance(out, Tensor):
            self._refuse_new_leading_dims(args, kwargs, out, split)
        return out

    def _split(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], carried: dict[int, tuple[SharedCall, ...]]
    ) -> tuple[tuple[Any, ...], dict[str, Any], set[int]]:
        """Replace each data-free operand that ``func`` broadcasts over the examples by its per-example view."""
        shapes = [t.shape for t in _tensors((args, kwargs))]
        if func in _ELEMENTWISE:
            try:
                target = torch.broadcast_shapes(*shapes)
            except RuntimeError:
                return args, kwargs, set()
            candidates = None  # every operand
        elif func in _MATMUL and len(shapes) == 2 and min(len(s) for s in shapes) >= 2:
            batch = torch.broadcast_shapes(shapes[0][:-2], shapes[1][:-2])
            target = torch.Size([*batch, shapes[0][-2], shapes[1][-1]])
            candidates = None
        elif func is F.scaled_dot_product_attention:
            query, key = args[0], args[1]
            target = torch.Size([*query.shape[:-1], key.shape[-2]])
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            candidates = {id(mask)}
        else:
            return args, kwargs, set()
        rows = self.rows
        if rows is None or len(target) < 2 or target[0] != rows:
            return args, kwargs, set()
        split: set[int] = set()

        def one(t: Any) -> Any:
            if not isinstance(t, Tensor) or id(t) not in carried:
                return t
            if candidates is not None and id(t) not in candidates:
                return t
            if not _over_examples(t, target, rows):
                return t  # already one row per example
            split.add(id(t))
            return self.engine.share(t, carried[id(t)], len(target))

        return _map(one, args), _map(one, kwargs), split

    def _refuse_new_leading_dims(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], out: Tensor, split: set[int]
    ) -> None:
        for arg in (*args, *kwargs.values()):
            if not isinstance(arg, Tensor) or id(arg) in split:
                continue
            if self._tapped.get(id(arg)) is arg and arg.dim() < out.dim():
                layer = self._layers[id(arg)]
                self.error = self.error or UnsupportedLayerError(
                    layer.path,
                    layer.module,
                    f"its output {tuple(arg.shape)} is broadcast to {tuple(out.shape)}, so its dim 0 is not the "
                    "example dimension, and its input holds example data (an output computed from no example data, "
                    "such as wpe(arange(T)), would be split per example here)",
                )


def _tensors(obj: Any) -> Iterator[Tensor]:
    """The tensors in ``obj`` and in the tuples, lists and dicts it nests (how torch functions take and return them)."""
    if isinstance(obj, Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _map(fn: Callable[[Any], Any], obj: Any) -> Any:
    """``obj`` with ``fn`` applied to each tensor in it (plain tuples, lists and dicts rebuilt)."""
    if isinstance(obj, Tensor):
        return fn(obj)
    if type(obj) in (tuple, list):
        return type(obj)(_map(fn, item) for item in obj)
    if isinstance(obj, dict):
        return {k: _map(fn, v) for k, v in obj.items()}
    return obj


def _moved(func: Any, source: Tensor, dim: int, out: Tensor) -> int | None:
    """Where an op took the examples of ``source`` (in ``dim``) in its output ``out``; ``None``: not known.

    A view keeps the examples' stride: a transpose, permute or unsqueeze moves them to the one dim of the same size
    and stride. An op that keeps the rank (elementwise, linear, norms, softmax, a copy) or broadcasts (``+``,
    ``matmul``) keeps them in place, counted from the right."""
    size = source.shape[dim]
    if out.dim() == 0:
        return None
    stride = source.stride(dim)
    if size > 1 and stride != 0 and _same_storage(out, source):
        matches = [j for j in range(out.dim()) if out.shape[j] == size and out.stride(j) == stride]
        if len(matches) == 1:
            return matches[0]
    if out.dim() != source.dim() and func not in _ELEMENTWISE and func not in _MATMUL:
        return None  # a reduction or a reshape that changed the rank
    aligned = dim + out.dim() - source.dim()
    return aligned if 0 <= aligned < out.dim() and out.shape[aligned] == size else None


def _same_storage(a: Tensor, b: Tensor) -> bool:
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # tensors without storage of their own (DTensor, functional ones)
        return False


def _over_examples(t: Tensor, target: torch.Size, rows: int) -> bool:
    """Whether broadcasting ``t`` to ``target`` stretches it over dim 0, the ``rows`` examples."""
    return len(target) >= 2 and target[0] == rows and (t.dim() < len(target) or t.shape[0] == 1)
