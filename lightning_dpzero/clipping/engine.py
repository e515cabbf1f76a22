"""The clipping engine: per-example clipped gradient sums in one backward pass (book-keeping, Bu et al. 2210.00038).

Forward: a hook on every module with trainable parameters records its input and routes its output through a
``_Tap``. Backward: the engine differentiates the summed per-example losses with respect to one scalar *anchor*
that every tap takes as an extra input, so autograd walks the whole graph down to the lowest tap but computes no
parameter gradient at all (the weight-gradient matmuls of non-private training are skipped). Each tap receives
its output gradient; the layer's rule turns (input, output gradient) into factored per-example gradients, whose
squared norms (including cross terms of shared parameters) are added per clipping group as they arrive. After the
backward, the clip factors are known and the clipped sums sum_i c_i G_i are formed from the same factors.

Nothing is stored on modules or parameters: hook handles and per-batch state live here, keyed by name.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from lightning_dpzero.clipping import rules as _rules  # noqa: F401  (registers the built-in rules)
from lightning_dpzero.clipping.contributions import (
    CANCELLATION_LIMIT,
    Contribution,
    Kind,
    VectorBlocks,
    clipped_sum,
    exact_per_example,
    full_shape,
    inner,
    merge,
    self_inner,
    zero_rows,
)
from lightning_dpzero.clipping.fallback import (
    RandomnessNotReplayed,
    RandomState,
    functorch_rule,
    may_draw_random_numbers,
)
from lightning_dpzero.clipping.functions import clip_factors
from lightning_dpzero.clipping.registry import ClippingRule, UnsupportedLayerError, rule_for
from lightning_dpzero.clipping.rules.norm import Statistics, forward_statistics
from lightning_dpzero.clipping.shared import SharedCall, SharedTap, SharedUse, per_example_view
from lightning_dpzero.clipping.styles import ClippingGroups, make_groups
from lightning_dpzero.clipping.watch import ForwardWatch
from lightning_dpzero.config import ClippingFunction, NonFinitePolicy, PrivacyConfig

__all__ = [
    "REENTRANT_CHECKPOINT",
    "ClippingEngine",
    "Probe",
    "TapRecord",
    "explain_reentrant_checkpointing",
    "validate_model",
]


@dataclass(eq=False)
class _Layer:
    path: str
    module: nn.Module
    rule: ClippingRule
    params: dict[str, str]  # attribute -> canonical parameter name (trainable only)
    groups: list[int] = field(default_factory=list)  # clipping groups its parameters belong to
    layout: _Layout | None = None  # where the examples are in its calls, once a watched batch has shown it


@dataclass(frozen=True)
class _Layout:
    """Where the examples are in a hooked module's call: dim 0, unless the model moved them (a sequence-first
    ``[T, n, E]`` layout after a transpose); followed op by op on watched batches (watch.py)."""

    dim: int = 0  # of its input, and of its output
    args: tuple[int | None, ...] = ()  # fallback modules: each positional input's (None: dim 0 when its size is n)
    kwargs: tuple[tuple[str, int | None], ...] = ()  # and each keyword input's


def validate_model(
    model: nn.Module, *, functorch_fallback: bool = True
) -> tuple[list[_Layer], dict[str, nn.Parameter], dict[str, str]]:
    """Check that every trainable parameter belongs to a module with a clipping rule (or the fallback).

    Args:
        model: the module to privatise.
        functorch_fallback: the parameters a module without a rule owns directly get per-example gradients from
            ``torch.func`` (``fallback.py``) instead of an error; never BatchNorm (it mixes examples) nor recurrent
            layers. An ``nn.MultiheadAttention`` (``nn.Transformer*`` layers), batch- or sequence-first, takes the
            fallback.

    Returns:
        The layers to hook, the trainable parameters by canonical name, and each parameter's owning module path.
    Raises:
        UnsupportedLayerError: naming the first module whose trainable parameters have no rule, and the fix.
    """
    canonical = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    layers: list[_Layer] = []
    owner: dict[str, str] = {}
    absorbed: set[str] = set()  # submodules whose parameters a fallback module uses without calling them
    for path, module in model.named_modules():
        if path in absorbed:
            continue
        own = {attr: p for attr, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        try:
            rule = rule_for(module, path)
        except UnsupportedLayerError as err:
            if not (err.no_rule and functorch_fallback) or _fallback_refused(module):
                raise  # a setting its rule refuses (Embedding(max_norm=...)) is not the fallback's to take either
            rule = functorch_rule
            for child in _CALLED_BY_PARAMETERS.get(type(module), ()):
                own.update(
                    {f"{child}.{attr}": p for attr, p in getattr(module, child).named_parameters() if p.requires_grad}
                )
                absorbed.add(f"{path}.{child}" if path else child)
        unknown = sorted(set(own) - {"weight", "bias"})
        if unknown and rule is not functorch_rule:
            raise UnsupportedLayerError(path, module, f"its parameter(s) {unknown} have no clipping rule")
        params = {attr: canonical[id(p)] for attr, p in own.items()}
        for attr, name in params.items():  # the module that holds it (an absorbed child's for its parameters)
            owner.setdefault(name, ".".join(filter(None, [path, *attr.split(".")[:-1]])))
        layers.append(_Layer(path, module, rule, params))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return layers, trainable, owner


def takes_fallback(module: nn.Module) -> bool:
    """Whether the engine gives ``module``'s own parameters their per-example gradients through the torch.func
    fallback: it owns trainable parameters and no rule covers it. Its forward is then recomputed per example, the
    submodules it calls included."""
    if not any(p.requires_grad for p in module.parameters(recurse=False)):
        return False
    try:
        rule_for(module, "")
    except UnsupportedLayerError as err:
        return err.no_rule
    return False


# Modules whose forward reads a child's parameters without calling the child: under the fallback, the child's
# parameters are differentiated with the module's own (nn.MultiheadAttention passes out_proj.weight to
# F.multi_head_attention_forward).
_CALLED_BY_PARAMETERS: dict[type, tuple[str, ...]] = {nn.MultiheadAttention: ("out_proj",)}


_FALLBACK_RANDOMNESS = (
    "It has no clipping rule and draws random numbers in its training forward (dropout) that its torch.func "
    "recompute could not draw again, so the gradient clipped would not be that of what ran. Set that dropout to 0, "
    "register a rule (lightning_dpzero.clipping.register_rule), or for nn.MultiheadAttention swap in "
    "lightning_dpzero.layers.DPMultiheadAttention (replace_multihead_attention(model))"
)


def _first_output_only(output: Any) -> bool:
    """A tuple whose first item is a tensor and whose other items carry no gradient (``nn.MultiheadAttention`` with
    ``need_weights=False``: ``(attn_output, None)``): the fallback differentiates the first item only."""
    return (
        isinstance(output, tuple)
        and len(output) > 0
        and isinstance(output[0], Tensor)
        and all(not (isinstance(item, Tensor) and item.requires_grad) for item in output[1:])
    )


@dataclass(eq=False)
class _Call:
    """All inputs of one call of a module without a rule (the torch.func fallback re-runs it per example)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    shared: bool = False  # no input holds example data: nothing is split, each example weights the same output
    random: RandomState | None = None  # the generators before the forward (training mode), to replay its dropout
    output: Tensor | None = None  # what the forward returned (detached), to check a replay against
    layout: _Layout = _Layout()  # where the examples are in the inputs and the output


@dataclass(eq=False)
class TapRecord:
    """One call of a hooked module seen by a probe: its input, its output and the loss's gradient w.r.t. the output
    (all detached; dim 0 should be the example)."""

    path: str
    activation: Tensor
    output: Tensor
    grad: Tensor | None = None


@dataclass(eq=False)
class Probe:
    """What one probed physical batch showed (``ClippingEngine.probing``): every tap call in forward order, and per
    trainable parameter the squared norm of each row's gradient ([n] float64, as clipping would have used it) and
    the unclipped sum of the rows' gradients (fp32)."""

    taps: list[TapRecord] = field(default_factory=list)
    norms: dict[str, Tensor] = field(default_factory=dict)
    sums: dict[str, Tensor] = field(default_factory=dict)


REENTRANT_CHECKPOINT = (
    "reentrant activation checkpointing (torch.utils.checkpoint(..., use_reentrant=True), DeepSpeed's "
    "activation checkpointing) runs its checkpointed modules without gradients and recomputes them in a nested "
    "backward that per-example clipping cannot take part in. Use non-reentrant checkpointing, which is supported "
    "and gives the same clipped gradients: torch.utils.checkpoint(..., use_reentrant=False), or for a Hugging Face "
    "model gradient_checkpointing_enable(gradient_checkpointing_kwargs={'use_reentrant': False})"
)


@contextlib.contextmanager
def explain_reentrant_checkpointing() -> Iterator[None]:
    """Around ``torch.autograd.grad``: torch's (or DeepSpeed's) refusal to take ``.grad()`` through a reentrant
    checkpoint becomes the message above."""
    try:
        yield
    except RuntimeError as err:
        if "heckpoint" in str(err) and ".grad()" in str(err):
            raise RuntimeError(REENTRANT_CHECKPOINT) from err
        raise


def _fallback_refused(module: nn.Module) -> bool:
    """Modules the fallback must not take: they mix the examples of a batch (batch norm), or carry state across
    time steps that torch.func cannot recompute per example (recurrent layers)."""
    return isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.RNNBase))


# Layers whose output is a fresh tensor that their own backward does not read (they save inputs and statistics, never
# the result; an Embedding's output is a view of the rows it gathered, and its backward reads the ids only): the tap
# may take the output itself, in place, instead of a copy. Exact types only: a subclass may return anything from its
# own forward.
_FRESH_OUTPUT_TYPES = frozenset({
    nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.Embedding,
})  # fmt: skip
_FRESH_OUTPUT_NAMES = frozenset({"transformers.pytorch_utils.Conv1D"})  # GPT-2's: addmm(...).view(...)


def _in_place_target(module: nn.Module, output: Tensor) -> Tensor | None:
    """The tensor the tap may mark as modified in place and hand on, with no copy; ``None``: copy ``output``.

    A copy keeps downstream in-place operations (``ReLU(inplace=True)``, ``x += y``) legal on any output. A fresh
    tensor made by a layer whose backward never reads it stays legal in place too: autograd rebases its history onto
    the tap (a layer that did read it would fail loudly, through autograd's version check, not silently). That is
    the output itself, or, for a Linear on [n, T, D] (torch returns a [n, T, P] view of its [n T, P] result; GPT-2's
    Conv1D alike), the whole tensor it views: the tap takes that one and the module returns a view of it, as the
    layer itself does.
    """
    kind = type(module)
    if output.grad_fn is None or (
        kind not in _FRESH_OUTPUT_TYPES and f"{kind.__module__}.{kind.__qualname__}" not in _FRESH_OUTPUT_NAMES
    ):
        return None
    if not output._is_view():
        return output
    base = output._base
    if (
        base is not None
        and not base._is_view()
        and base.grad_fn is not None
        and output.is_contiguous()
        and base.is_contiguous()
        and output.storage_offset() == 0
        and output.numel() == base.numel()
    ):
        return base
    return None


class _Tap(torch.autograd.Function):
    """Identity on a module's output that hands the output gradient to the engine."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, tap: _TapCall, in_place: bool) -> Tensor:
        # One argument for what the backward needs: autograd.Function.apply inspects every argument on each call.
        ctx.tap = tap
        if in_place:  # see _in_place_target
            ctx.mark_dirty(output)
            return output
        # A fresh tensor, not a view: downstream in-place ops (ReLU(inplace=True), x += ...) must stay legal.
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, ...]:
        tap: _TapCall = ctx.tap
        engine = tap.engine
        if engine._passive:  # another backward through the same graph (the self-check's autograd reference)
            return grad, None, None, None
        if tap.activation is None:
            raise RuntimeError(f"module '{tap.layer.path}': a second backward through one recorded forward")
        if tap.activation._version != tap.version:
            raise RuntimeError(
                f"the input of module '{tap.layer.path}' was modified in place after the module used it; "
                "per-example gradients need the value it saw. Avoid the in-place operation."
            )
        if tap.shared is not None and tap.shared.shared:  # its uses reported each example's gradient (shared.py)
            return grad, None, None, None
        output_grad = grad if grad.shape == tap.shape else grad.reshape(tap.shape)  # tapped the tensor it views
        examples_first = output_grad.movedim(tap.dim, 0) if tap.dim else output_grad
        if tap.record is not None:
            tap.record.grad = examples_first.detach()
        if engine._tracks_peak:
            engine._bound_peak(grad.numel() * grad.element_size() + tap.input_grad_bytes)
        engine._receive(tap.layer, tap.activation, examples_first, tap.call, tap.statistics)
        engine._room = None
        tap.activation = tap.call = tap.statistics = None
        return grad, None, None, None


class _TapCall:
    """What a tap's backward needs of its module's call (one object: see _Tap.forward)."""

    __slots__ = ("activation", "call", "dim", "engine", "input_grad_bytes", "layer", "record", "shape", "shared",
                 "statistics", "version")  # fmt: skip

    def __init__(
        self,
        engine: ClippingEngine,
        layer: _Layer,
        activation: Tensor,
        record: TapRecord | None,
        call: _Call | None,
        shared: SharedCall | None,
        dim: int,
        shape: torch.Size,
        statistics: Statistics | None,
        input_grad_bytes: int,
    ) -> None:
        self.engine, self.layer, self.record, self.call = engine, layer, record, call
        self.activation: Tensor | None = activation
        self.version = activation._version  # what the module saw: the backward checks that it is unchanged
        self.shared, self.dim, self.shape, self.statistics = shared, dim, shape, statistics
        self.input_grad_bytes = input_grad_bytes  # the gradient autograd forms for the module's input (0: none)


class _Bytes:
    """A running total of bytes that weak references' callbacks can lower (no reference back to the engine)."""

    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0


_VECTOR_ELEMENTS_PER_ROW = 1 << 16  # per-example vectors side by side at once, elements per example (VectorBlocks)
_FEWEST_ROWS = 8  # an approved block is made at least this many examples at a time (ClippingEngine._settle)


class ClippingEngine:
    """Per-example clipping for one model, by the style and function of ``config``.

    Args:
        model: the module whose trainable parameters are privatised; validated at construction.
        config: clip norm, style, groups, function and norm mode.
    """

    def __init__(self, model: nn.Module, config: PrivacyConfig) -> None:
        self.config = config
        self.layers, self.params, owner = validate_model(model, functorch_fallback=config.functorch_fallback)
        self.owner = owner  # parameter name -> the path of the module that owns it
        # Frozen BatchNorm still mixes the examples of a batch through its statistics in training mode.
        self._mixing = [(p, m) for p, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not self.params:
            raise ValueError("the model has no trainable parameters; there is nothing to train privately.")
        self.groups: ClippingGroups = make_groups(config, [(name, owner[name]) for name in self.params])
        self.summed: dict[str, Tensor] = {}  # clipped sums over the physical batches of the current logical step
        # Streaming: each parameter's clipped sum of one physical batch goes to ``sink(name, sum)`` as soon as its
        # group is clipped (``sink(name, None)`` for parameters without a contribution, at the batch's end), and
        # ``summed`` stays empty: no full-size buffer lives across physical batches (sharded strategies).
        self.sink: Callable[[str, Tensor | None], None] | None = None
        self._emitted: set[str] = set()
        self.seen: set[str] = set()  # parameters that received a contribution since the last reset
        # Hooked modules that ran while a physical batch was recorded but with gradients disabled (torch.no_grad, or
        # the first forward of reentrant activation checkpointing): named when their parameters get no gradient.
        self.ungraded: set[str] = set()
        self.last_norm_modes: dict[str, str] = {}  # layer path -> "ghost" / "instantiate" / "direct", for tests
        self._handles: list[RemovableHandle] = []
        self._anchor: Tensor | None = None  # the scalar every tap of the physical batch being recorded takes
        self._recorded: Tensor | None = None  # the anchor of the last recorded physical batch, until its backward
        # Per parameter block (name, first row): its contributions in this physical batch, and the squared norm and
        # mass ([n] float64, contributions.py) of each example's gradient block, cross terms of shared uses included.
        self._contributions: dict[tuple[str, int | None], list[Contribution]] = defaultdict(list)
        self._norm2: dict[tuple[str, int | None], Tensor] = {}
        self._mass: dict[tuple[str, int | None], Tensor] = {}
        self._mask: Tensor | None = None  # [n] of the physical batch being differentiated
        self._pending_taps: dict[int, int] = defaultdict(int)  # group -> taps recorded but not yet reported
        for layer in self.layers:
            layer.groups = sorted({self.groups.group_of[name] for name in layer.params.values()})
        self._watch: ForwardWatch | None = None  # the ops of the batch being recorded (watch.py)
        self._watched_once = False
        self._shares = False  # some module's output is shared by all examples: every batch is watched
        self._model = weakref.ref(model)  # for its buffers (data-free)
        # Examples whose contribution (to some clipping group) was dropped as non-finite. Not private: a count of
        # the data owner's examples, for diagnostics; it is never logged by the library.
        self.non_finite_examples = 0
        self._dropped: Tensor | None = None  # [n] of the physical batch being differentiated
        # (example, block) squared norms recomputed exactly because fp32 cancellation could have under-estimated them
        # (adversarial or extreme inputs; 0 on ordinary data). Not private either; never logged by the library.
        self.exact_recomputations = 0
        self._probe: Probe | None = None
        self._passive = False  # taps pass gradients through without reporting them
        self._rows: int | None = None  # p while a physical batch is recorded, when the strategy says it
        self._random_before: dict[int, RandomState] = {}  # id(layer) -> generators before its forward (fallback)
        # The storages of the hooked modules' inputs and outputs in the physical batch being recorded (by id: a weak
        # reference and the size; those alive at the end of its forward), to tell how much memory the batch holds
        # (_live); and the contributions whose norm mode is settled at their group's clipping (Contribution.deferred).
        self._forward_storage: dict[int, tuple[weakref.ref, int]] = {}
        self._forward_bytes = _Bytes()  # of those alive now (lowered by the weak references' callbacks)
        # What the contributions hold beyond those storages, kept up to date as they change (_track): per block key,
        # {storage id: bytes}; per storage id, how many keys hold it; and the total (_held).
        self._held_by_key: dict[tuple[str, int | None], dict[int, int]] = {}
        self._held_keys: Counter[int] = Counter()
        self._held_total = 0
        # Per group, its blocks' keys held now, each with the order in which it was first received (``_finalize``
        # takes a group's keys from here, not from a scan of every key); and the groups holding factors or blocks
        # (not only per-example vectors: ``_light``).
        self._keys_of_group: defaultdict[int, dict[tuple[str, int | None], int]] = defaultdict(dict)
        self._received = 0
        self._heavy: set[int] = set()
        # A lower bound of the physical batch's peak of memory so far, in the terms of _live (bytes); followed tap by
        # tap in the backward once some model layer's norm mode has been deferred (before, the forward's end only).
        self._peak_bound = 0
        self._tracks_peak = False
        self._room: int | None = None  # at the tap being received, when followed (_bound_peak)
        # Groups complete in the backward but held to its end, and the bytes their blocks hold (_hold_back); the
        # bytes the forward's storages held at its end, which bound what may be held back.
        self._held_back: set[int] = set()
        self._held_back_bytes = 0
        self._forward_end_bytes = 0
        self._deferred: list[tuple[tuple[str, int | None], Contribution, str]] = []
        # Blocks held as one per-example vector (SAMPLE: norm layers', biases'): their squared norms and clipped sums
        # are taken at their clipping, side by side with the other such blocks clipped then (VectorBlocks).
        self._vectors: dict[tuple[str, int | None], Contribution] = {}

    # ----------------------------------------------------------------------------------------------- hooks
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer), with_kwargs=True))
            if layer.rule is functorch_rule:
                self._handles.append(layer.module.register_forward_pre_hook(self._random_state_hook(layer)))
        for path, module in self._mixing:
            self._handles.append(module.register_forward_pre_hook(self._mixing_hook(path)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _mixing_hook(self, path: str):
        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._anchor is not None and module.training:
                raise UnsupportedLayerError(path, module)  # the BatchNorm advice: batch statistics mix examples

        return hook

    def _random_state_hook(self, layer: _Layer):
        """Before a fallback module's training forward: the generators' state, so that its recompute can draw the
        same dropout masks (fallback.py)."""

        def hook(module: nn.Module, args: tuple[Any, ...]) -> None:
            if self._anchor is not None and module.training and torch.is_grad_enabled():
                self._random_before[id(layer)] = RandomState.capture(self._anchor.device)

        return hook

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            if self._anchor is None:
                return None
            if not torch.is_grad_enabled():
                self.ungraded.add(layer.path)
                return None
            rest: tuple[Any, ...] | None = None
            if layer.rule is functorch_rule and not isinstance(output, Tensor):
                if not _first_output_only(output):
                    raise UnsupportedLayerError(
                        layer.path,
                        module,
                        f"it has no clipping rule and returns a {type(output).__name__} other than (tensor, values "
                        "without gradient), so the torch.func fallback cannot take it: register a rule "
                        "(lightning_dpzero.clipping.register_rule) or freeze its own parameters (requires_grad_(False))"
                        + (
                            "; an nn.MultiheadAttention must be called with need_weights=False (as nn.Transformer* "
                            "layers do), or swapped for DPMultiheadAttention (replace_multihead_attention)"
                            if isinstance(module, nn.MultiheadAttention)
                            else ""
                        ),
                    )
                output, rest = output[0], tuple(output[1:])
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            if not args or not isinstance(args[0], Tensor):
                if layer.rule is not functorch_rule:
                    raise UnsupportedLayerError(
                        layer.path, module, "its input must be passed positionally as a tensor (e.g. layer(x))"
                    )
            rows = self._rows
            activation = args[0] if args and isinstance(args[0], Tensor) else output
            watch, shared = self._watch, None
            layout = self._layout(layer, args, kwargs, activation, watch)
            if layout.dim:  # examples moved out of dim 0 (sequence-first): the rule sees them first again
                activation = activation.movedim(layout.dim, 0)
            elif rows is not None and rows > 1 and output.dim() > 0 and output.shape[0] == 1:
                # Computed once for the whole batch, with a batch dim of 1 (positions: wpe(arange(T)[None])): its
                # output would be broadcast over the examples, and autograd would hand the tap their summed
                # gradient. Expanded here (a view), each example's row gets its own gradient.
                output = output.expand(rows, *output.shape[1:])
                args = tuple(_expand_rows(a, rows) for a in args)
                kwargs = {k: _expand_rows(v, rows) for k, v in kwargs.items()}
                activation = _expand_rows(activation, rows)
            elif watch is not None:
                shared = watch.call_for(layer, (args, kwargs), output, activation.detach())
            call = None
            if layer.rule is functorch_rule:
                random = self._random_before.pop(id(layer), None)
                call = _Call(
                    tuple(_detached(a) for a in args),
                    {k: _detached(v) for k, v in kwargs.items()},
                    random=random,
                    # kept only where a replay may need it: an activation-sized tensor per call otherwise
                    output=output.detach() if random is not None and may_draw_random_numbers(module) else None,
                    layout=layout,
                )
            record = None
            if self._probe is not None:
                record = TapRecord(layer.path, activation.detach(), output.detach().movedim(layout.dim, 0))
                self._probe.taps.append(record)
            if shared is not None:
                shared.call, shared.record = call, record
            # In place only in the steady state: not while the watch follows values by identity, nor while a probe
            # keeps the output (a downstream in-place op would change what it recorded).
            target = None if watch is not None or record is not None else _in_place_target(module, output)
            # Read before the tap takes the output (in place, it becomes the output's autograd node). Only with the
            # examples in dim 0: the rule can check the statistics' shape against its input, not their order.
            statistics = forward_statistics(module, output) if layout.dim == 0 else None
            tap = _TapCall(
                self, layer, activation.detach(), record, call, shared, layout.dim, output.shape, statistics,
                activation.numel() * activation.element_size() if activation.requires_grad else 0,
            )  # fmt: skip
            tapped = _Tap.apply(output if target is None else target, self._anchor, tap, target is not None)
            self._note_storage(activation)
            self._note_storage(tapped)
            if tapped.shape != output.shape:
                tapped = tapped.view(output.shape)
            for k in layer.groups:
                self._pending_taps[k] += 1
            if watch is not None:
                watch.track(tapped, layer, shared, layout.dim)
            return tapped if rest is None else (tapped, *rest)

        return hook

    def _note_storage(self, tensor: Tensor) -> None:
        """Remember ``tensor``'s storage (a weak reference, and its size) as one the forward pass used."""
        try:
            storage = tensor.untyped_storage()
        except (RuntimeError, NotImplementedError):  # no storage of its own (a wrapper subclass): not counted
            return
        if not self._is_forward_storage(storage):  # (an id freed in the forward may be reused by a new storage)
            total, size = self._forward_bytes, storage.nbytes()
            total.value += size

            def freed(_: weakref.ref, total: _Bytes = total, size: int = size) -> None:
                total.value -= size

            self._forward_storage[id(storage)] = (weakref.ref(storage, freed), size)

    def _is_forward_storage(self, storage: torch.UntypedStorage) -> bool:
        entry = self._forward_storage.get(id(storage))
        return entry is not None and entry[0]() is storage

    def _live(self) -> int:
        """Bytes the physical batch holds now, as far as the engine can see: the storages of hooked modules' inputs and
        outputs that lived at the end of the forward and still do, and what the engine holds beyond them (``_held``)."""
        return self._forward_live() + self._held()

    def _forward_live(self) -> int:
        return self._forward_bytes.value

    def _held(self) -> int:
        """Bytes the engine holds beyond the forward's storages: output gradients, per-example blocks. Kept up to date
        by ``_track`` (constant time here: the bound is read at every tap, and a model may hold thousands of
        contributions)."""
        return self._held_total

    def _track(self, key: tuple[str, int | None]) -> None:
        """Re-read the storages ``key``'s contributions hold, after they changed (made, settled, spared, merged,
        clipped and let go); and file the key under its group."""
        group = self.groups.group_of[key[0]]
        contributions = self._contributions.get(key, ())
        if contributions:
            if key not in self._keys_of_group[group]:
                self._keys_of_group[group][key] = self._received
                self._received += 1
            if any(c.kind is not Kind.SAMPLE for c in contributions):
                self._heavy.add(group)
        else:
            self._keys_of_group[group].pop(key, None)
        if not self._tracks_peak:  # nothing reads the bound (no deferred call yet): nothing to count
            return
        new = self._held_storages(contributions)
        for sid, size in self._held_by_key.pop(key, {}).items():
            self._held_keys[sid] -= 1
            if not self._held_keys[sid]:
                del self._held_keys[sid]
                self._held_total -= size
        for sid, size in new.items():
            if not self._held_keys[sid]:
                self._held_total += size
            self._held_keys[sid] += 1
        if new:
            self._held_by_key[key] = new

    def _bound_peak(self, in_flight: int) -> None:
        """At a tap in the backward: the layer's backward, next, holds what lives now, the output gradient and the
        input gradient it forms (``in_flight`` bytes) at once. ``_room``: what a block made now could take without
        raising the bound (negative: none)."""
        level = self._live() + in_flight
        self._room = self._peak_bound - level
        self._peak_bound = max(self._peak_bound, level)

    def _settle(self, deferred: list[tuple[tuple[str, int | None], Contribution, str]]) -> None:
        """Settle the norm mode of ``deferred`` contributions (Contribution.deferred) and add their own squared norms:
        instantiated, the faster way, where the block and the patches of at least one example fit under the peak of
        memory the batch has already reached (those that save the most per byte first); the ghost norm for the
        others."""
        for key, c, path in sorted(deferred, key=lambda item: -item[1].ghost_cost()):
            block, per_example = c.block_bytes()
            # Below the peak so far, the step's peak is unchanged (what the last one let go of is counted); the
            # patches are built as many examples at a time as the room left holds (fewer, smaller matmuls are slower).
            room = self._peak_bound - self._live() - block
            rows_at_once = room // per_example if per_example else None
            instantiate = room >= 0 and (rows_at_once is None or rows_at_once >= 1)
            if c.approved:  # the memory rule took its block: never the ghost norm (far slower there), nor made
                # fewer than _FEWEST_ROWS examples at a time (the benchmark CNN's second convolution, bf16, 32
                # examples: 4.4 ms one at a time, 2.0 four, 1.6 eight, 1.4 all at once)
                instantiate, rows_at_once = True, None if rows_at_once is None else max(_FEWEST_ROWS, rows_at_once)
            c.settle(instantiate, rows_at_once)
            self.last_norm_modes[path] = "instantiate" if instantiate else "ghost"
            norm2, mass = self_inner(c)
            c.spare()
            self._norm2[key], self._mass[key] = self._norm2[key] + norm2, self._mass[key] + mass
            self._track(key)

    def _light(self, groups: set[int]) -> set[int]:
        """Of ``groups``, those that hold per-example gradients only (norm layers' and biases' [n, P]), no factors or
        blocks: clipping them early frees little, so they are clipped together after the backward, in one pass
        instead of one each."""
        return groups - self._heavy

    def _hold_back(self, groups: set[int]) -> set[int]:
        """Of ``groups``, complete in the backward, those to clip after it with the others, in one pass: their blocks
        fit, with those already held back, in the bytes the forward's storages held at its end and have let go of
        since: what is held back, with the storages still alive, stays within what the forward held at its end (a
        lower bound of the step's peak; the tap's own blocks come on top, as without holding back). One pass over
        every group costs less than a pass per group (layer-wise clipping of the benchmark's transformers: ~3 ms of
        ~80 per step). ``_receive`` clips them as soon as an output gradient would not fit beside them. Not when
        clipped sums stream to a sink (every rank emits them in the same order), nor for a group with a deferred
        contribution (its block is not made yet)."""
        if self.sink is not None or not groups:
            return set()
        deferred = {self.groups.group_of[key[0]] for key, _, _ in self._deferred}
        free = self._forward_end_bytes - self._forward_live() - self._held_back_bytes
        out = set()
        for group in sorted(groups - deferred):
            size = self._group_bytes(group)
            if size <= free:
                out.add(group)
                free -= size
                self._held_back_bytes += size
        self._held_back |= out
        return out

    def _group_bytes(self, group: int) -> int:
        """Bytes the blocks of ``group`` hold beyond the forward's storages."""
        keys = self._keys_of_group.get(group, ())
        return sum(self._held_storages(c for key in keys for c in self._contributions.get(key, ())).values())

    def _held_storages(self, contributions: Iterable[Contribution]) -> dict[int, int]:
        """{storage id: bytes} of what ``contributions`` hold beyond the forward's storages."""
        held: dict[int, int] = {}
        for c in contributions:
            for tensor in (c.left, c.right, c.instantiated):
                if tensor is not None:
                    storage = tensor.untyped_storage()
                    if not self._is_forward_storage(storage):
                        held[id(storage)] = storage.nbytes()
        return held

    def _spill(self, incoming: int) -> None:
        """Clip the groups held back now if ``incoming`` more bytes would not fit beside them (``_hold_back``)."""
        if self._held_back and self._forward_live() + self._held_back_bytes + incoming > self._forward_end_bytes:
            held, self._held_back, self._held_back_bytes = self._held_back, set(), 0
            self._finalize(held, spill=True)

    def _postponed(self, groups: set[int]) -> set[int]:
        """Of ``groups``, clipped in the backward, those to clip after it instead: a deferred contribution's block does
        not fit under the peak so far now, while the activations still live, but would once they are gone (with the
        patches of one example; an approved block, always instantiated, with as many examples at once as it takes by
        default, ``Contribution.rows_at_once``). Their factors are held to the end of the backward (as all-layer
        clipping holds every layer's), where the block takes the memory the activations leave (a faster norm than the
        ghost norm; fewer, larger matmuls). Not when clipped sums stream to a sink: every rank must emit them in the
        same order."""
        if self.sink is not None:
            return set()
        held = self._held()
        live = self._forward_live() + held
        out = set()
        for key, c, _ in self._deferred:
            group = self.groups.group_of[key[0]]
            if group in groups:
                block, per_example = c.block_bytes()
                need = block + per_example * (min(c.num_examples, c.rows_at_once()) if c.approved else 1)
                if live + need > self._peak_bound >= held + need:
                    out.add(group)
        return out

    def _layout(
        self,
        layer: _Layer,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        activation: Tensor,
        watch: ForwardWatch | None,
    ) -> _Layout:
        """Where the examples are in this call: as the watch followed them on a watched batch (and the same in every
        call of the module), else as the last watched batch showed."""
        if watch is None:
            return layer.layout or _Layout()
        dim = watch.example_dim(activation) or 0  # data-free, or not followed: dim 0 (the self-check verifies)
        layout = _Layout(dim)
        if layer.rule is functorch_rule:
            moved = [watch.example_dim(a) if isinstance(a, Tensor) else None for a in args]
            keyed = {k: watch.example_dim(v) if isinstance(v, Tensor) else None for k, v in kwargs.items()}
            layout = _Layout(dim, tuple(d or None for d in moved), tuple((k, d or None) for k, d in keyed.items()))
        module = layer.module
        if isinstance(module, nn.MultiheadAttention) and not module.batch_first and dim != 1:
            raise UnsupportedLayerError(
                layer.path,
                module,
                "it is sequence-first (batch_first=False), but the examples of its query were not found in dim 1 "
                f"(found: {'not known' if watch.example_dim(activation) is None else f'dim {dim}'}); pass it "
                "[L, n, E] inputs transposed from the batch, or build it with batch_first=True",
            )
        if layer.layout is not None and layer.layout.dim != layout.dim:
            raise UnsupportedLayerError(
                layer.path,
                module,
                f"it is called with the examples in dim {layer.layout.dim} of its input in one call and in dim "
                f"{layout.dim} in another; per-example clipping needs one layout per module",
            )
        layer.layout = layout
        return layout

    @contextlib.contextmanager
    def recording(self, device: torch.device, rows: int | None = None) -> Iterator[None]:
        """Within this block, forward passes of hooked modules are recorded for one physical batch.

        Args:
            device: where the anchor lives.
            rows: p, the physical batch's rows: a hooked module whose output has a batch dim of 1 (computed once
                for every example) gets it expanded to p rows, so that each example gets its own gradient; one
                called on inputs without example data gets them where its output meets the examples (shared.py).
        """
        self._rows = rows
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._forward_storage.clear()
        self._forward_bytes = _Bytes()
        self._recorded = None
        first = not self._watched_once
        if first or self._shares:
            model = self._model()
            buffers = {id(b) for b in model.buffers()} if model is not None else set()
            self._watch = ForwardWatch(self, rows, buffers, first=first)
        watch = self._watch
        try:
            with watch if watch is not None else contextlib.nullcontext():
                yield
            if watch is not None:
                watch.finish()
                self._shares = self._shares or any(call.shared for call in watch.calls)
            self._watched_once = True
            # Only the storages alive at the end of the forward lived together: an output no backward reads (the input
            # of a tanh) is freed within the forward.
            self._forward_storage = {key: item for key, item in self._forward_storage.items() if item[0]() is not None}
            self._peak_bound = self._live()
            self._forward_end_bytes = self._forward_live()
        finally:
            self._recorded, self._anchor, self._watch, self._rows = self._anchor, None, None, None

    def share(self, value: Tensor, calls: tuple[SharedCall, ...], ndim: int) -> Tensor:
        """``value`` (data-free, derived from the outputs of ``calls``), as an op broadcasting it to ``ndim`` dims
        over the n examples sees it: expanded to [n, ...] (a view), through a tap that reports each example's
        gradient of this use to each call's layer (shared.py)."""
        assert self._rows is not None and self._anchor is not None
        n = self._rows
        view = value[(None,) * (ndim - value.dim())] if ndim > value.dim() else value  # [1, ..., *value.shape]
        expanded = view.expand(n, *view.shape[1:])
        records: list[TapRecord | None] = []
        for call in calls:
            if not call.shared:  # its own tap passes through from now on; its uses report instead
                call.shared = True
                if call.call is not None:
                    call.call.shared = True
                for k in call.layer.groups:
                    self._pending_taps[k] -= 1
                if self._probe is not None and call.record is not None:
                    self._probe.taps.remove(call.record)
            for k in call.layer.groups:
                self._pending_taps[k] += 1
            record = None
            if self._probe is not None:
                record = TapRecord(call.layer.path, per_example_view(call.activation, n), expanded.detach())
                self._probe.taps.append(record)
            records.append(record)
        outputs = [None if call.output is None else call.output() for call in calls]
        if any(o is None for o in outputs):
            raise RuntimeError("a shared output was freed before its use; this is a bug in lightning_dpzero")
        use = SharedUse(value, calls, [o for o in outputs if o is not None], records)
        return SharedTap.apply(expanded, self._anchor, self, use)

    @contextlib.contextmanager
    def probing(self) -> Iterator[Probe]:
        """Physical batches recorded and differentiated in this block are examined, not clipped: nothing is added
        to the step's clipped sums, the sink or the counters (the per-example self-check, ``selfcheck.py``)."""
        self._probe = Probe()
        try:
            yield self._probe
        finally:
            self._probe = None

    @contextlib.contextmanager
    def passive(self) -> Iterator[None]:
        """Backward passes in this block go through the taps as through identities (nothing is reported)."""
        self._passive = True
        try:
            yield
        finally:
            self._passive = False

    # -------------------------------------------------------------------------------------------- backward
    def backward(self, loss: Tensor, mask: Tensor) -> None:
        """Add this physical batch's clipped per-example gradients to ``summed``.

        Args:
            loss: the sum over the n examples of their own losses (a scalar), computed in the last ``recording``.
            mask: [n], 1 for real examples and 0 for padding rows (which contribute exactly zero).
        """
        anchor, self._recorded = self._recorded, None
        self._mask = mask
        try:
            if anchor is not None and loss.requires_grad:
                with explain_reentrant_checkpointing():
                    torch.autograd.grad(loss, [anchor], allow_unused=True)
            # groups whose taps did not all report, postponed ones, or all-layer
            self._finalize(range(len(self.groups)), last=True)
            if self.sink is not None and self._probe is None:
                for name in self.params:  # the same calls in the same order on every rank, whatever was reached
                    if name not in self._emitted:
                        self.sink(name, None)
        finally:
            self._emitted.clear()
            if self._dropped is not None:
                self.non_finite_examples += int(self._dropped.sum())
                self._dropped = None
            self._mask = None
            self._contributions.clear()
            self._pending_taps.clear()
            self._norm2.clear()
            self._mass.clear()
            self._deferred.clear()
            self._vectors.clear()
            self._forward_storage.clear()
            self._held_by_key.clear()
            self._held_keys.clear()
            self._held_total = 0
            self._keys_of_group.clear()
            self._heavy.clear()
            self._held_back.clear()
            self._held_back_bytes = 0

    def _receive(
        self,
        layer: _Layer,
        activation: Tensor,
        grad_output: Tensor,
        call: _Call | None = None,
        statistics: Statistics | None = None,
    ) -> None:
        """Called from a tap's backward: this call's contributions and their squared norms (``statistics``: what a
        norm layer's forward saved, rules.norm.forward_statistics)."""
        n = None if self._mask is None else self._mask.numel()
        if (
            n is not None
            and grad_output.dim() > 0
            and grad_output.shape[0] != n
            and grad_output.shape[0] % n == 0
            and activation.dim() > 0
            and activation.shape[0] == grad_output.shape[0]
        ):
            # Rows flattened to [n * k, ...] between layers (OPT's feed-forward sees [n * T, D]): example i's rows are
            # i * k .. (i + 1) * k - 1, as torch's row-major flatten lays them out. The per-example self-check
            # verifies that no row of another example moves with example i.
            k = grad_output.shape[0] // n
            grad_output = grad_output.reshape(n, k, *grad_output.shape[1:])
            activation = activation.reshape(n, k, *activation.shape[1:])
            statistics = None  # laid out by rows, not examples
        if n is not None and (grad_output.dim() == 0 or grad_output.shape[0] != n):
            raise UnsupportedLayerError(
                layer.path,
                layer.module,
                f"its output has shape {tuple(grad_output.shape)}, but per-example clipping needs the "
                f"{n} examples of the physical batch in dim 0 of every hooked module's input and "
                "output. A module called on something computed from no example data (wpe(torch.arange(T)), a "
                "relative position bias) is split per example where a broadcasting op (+, *, where, matmul, an "
                "attention mask) meets the examples; this one reached them otherwise. Expand its input per example "
                f"(wpe(pos.expand(n, T))) or freeze it: get_submodule('{layer.path}').requires_grad_(False)",
            )
        with _grad_off():
            self._spill(grad_output.numel() * grad_output.element_size())
            if call is not None:
                try:
                    contributions = functorch_rule(layer.module, activation, grad_output, layer.params, call=call)
                except RandomnessNotReplayed as err:
                    raise UnsupportedLayerError(layer.path, layer.module, f"{err}. {_FALLBACK_RANDOMNESS}") from err
                except RuntimeError as err:
                    if "randomness" not in str(err):
                        raise
                    raise UnsupportedLayerError(layer.path, layer.module, _FALLBACK_RANDOMNESS) from err
            else:
                contributions = (
                    layer.rule(layer.module, activation, grad_output, layer.params)
                    if statistics is None
                    else layer.rule(layer.module, activation, grad_output, layer.params, statistics=statistics)  # type: ignore[call-arg]
                )
            for c in contributions:
                c.choose_norm_mode(self.config.norm_mode, self._room)
                key = (c.param, None if c.rows is None else c.rows.start)
                if c.deferred:  # its own term is added when its mode is settled (_settle)
                    norm2 = mass = torch.zeros(grad_output.shape[0], dtype=torch.float64, device=grad_output.device)
                    self._deferred.append((key, c, layer.path))
                    if not self._tracks_peak:  # from now on, at every tap: count what is held so far
                        self._tracks_peak = True
                        for held in list(self._contributions):
                            self._track(held)
                elif c.instantiated is not None:
                    self.last_norm_modes[layer.path] = "instantiate"
                elif c.left is not None and c.left.dim() == 3 and c.left.shape[1] > 1:
                    self.last_norm_modes.setdefault(layer.path, "ghost")
                else:
                    self.last_norm_modes.setdefault(layer.path, "direct")
                previous = self._contributions[key]
                first = self._vectors.pop(key, None)  # a block used again: its first use's norm was left to later
                merged = merge(previous[0], c) if len(previous) == 1 and not c.deferred else None
                if merged is not None:  # the same parameter used again, its gradient added into one block
                    self._contributions[key] = [merged]
                    if merged.kind is Kind.SAMPLE:  # still one per-example vector: its norm is left to the clipping
                        self._vectors[key] = merged
                    else:
                        self._norm2[key], self._mass[key] = self_inner(merged)  # of the sum: replaces the first's
                    self._track(key)
                    continue
                if first is not None:
                    self._norm2[key], self._mass[key] = self_inner(first)
                if c.kind is Kind.SAMPLE and not previous:  # its norm and clipped sum with the others' (_finalize)
                    self._vectors[key] = c
                    previous.append(c)
                    self._track(key)
                    continue
                if not c.deferred:
                    norm2, mass = self_inner(c)
                for other in previous:  # the same parameter used again: cross terms
                    cross, cross_mass = inner(other, c)
                    norm2, mass = norm2 + 2.0 * cross, mass + 2.0 * cross_mass
                c.spare()
                previous.append(c)
                if key in self._norm2:
                    norm2, mass = norm2 + self._norm2[key], mass + self._mass[key]
                self._norm2[key], self._mass[key] = norm2, mass
                self._track(key)
            # A group is final once every tap that feeds it has reported: clip it now and free its activations
            # and output gradients (layer-, param- and group-wise clipping peak lower than all-layer; 2310.19215).
            if len(self.groups) > 1:
                done = []
                for k in layer.groups:
                    self._pending_taps[k] -= 1
                    if self._pending_taps[k] == 0:
                        done.append(k)
                self._finalize(done)

    def _exact_rows(
        self, keys: list[tuple[str, int | None]], norm2: Tensor, safe: Tensor
    ) -> dict[tuple[str, int | None], Tensor]:
        """Recompute, exactly, the squared norms that fp32 could have got wrong (``safe`` False: ``_safe``).

        Where an example's squared norm of a block is small next to the mass it was summed from (cancellation:
        opposite rows of an adversarial input; values near the ends of fp32's range), its gradient block is
        instantiated in float64 from the recorded factors and its squared norm replaces the fp32 one in ``norm2``
        ([blocks, n], in place). ``_finalize`` then adds that same instantiated block (times its clip factor) to the
        clipped sum instead of the factored one, so that the norm which sets the clip factor is the norm of exactly
        what is summed.

        Returns:
            block key -> the indices [k] of its examples recomputed, for blocks with any.
        """
        exact: dict[tuple[str, int | None], Tensor] = {}
        risky = ~safe
        for index, key in enumerate(keys):
            rows = torch.nonzero(risky[index]).flatten()
            if not rows.numel():
                continue
            for chunk, blocks in _exact_chunks(self._contributions[key], rows):
                norm2[index, chunk] = blocks.reshape(chunk.numel(), -1).square().sum(1)
            exact[key] = rows
            self.exact_recomputations += rows.numel()
        return exact

    def _finalize(self, groups: Iterable[int], last: bool = False, spill: bool = False) -> None:
        """Clip factors of ``groups`` from their norms; add their clipped sums to ``summed``; free them.

        Args:
            last: after the backward. Before it, groups that hold little (``_light``), groups with a deferred
                contribution whose block does not fit under the peak so far (``_postponed``) and groups whose blocks
                fit in what the forward's storages have let go of (``_hold_back``) are left to then.
            spill: in the backward, the groups held back, clipped now: what they hold no longer fits (``_receive``).
        """
        groups = set(groups)
        if not last and self.sink is None:
            groups -= self._light(groups)
        if not last and self._deferred:
            groups -= self._postponed(groups)
        if not last and not spill:
            groups -= self._hold_back(groups)
        keys = sorted(
            (key for group in groups for key in self._keys_of_group.get(group, ())),
            key=lambda key: self._keys_of_group[self.groups.group_of[key[0]]][key],
        )  # in the order received
        if not keys:
            return
        assert self._mask is not None
        with _grad_off():
            deferred = [item for item in self._deferred if self.groups.group_of[item[0][0]] in groups]
            if deferred:
                self._settle(deferred)
                self._deferred = [item for item in self._deferred if item[1].deferred]
            vectors = self._vector_blocks(keys)
            norm2s = [self._norm2.pop(key) for key in keys]
            masses = [self._mass.pop(key) for key in keys]
            block_norm2 = _rows(norm2s)  # [blocks, n] float64
            if self._probe is not None:
                safe = _safe(block_norm2, _rows(masses))
                if not bool(safe.all()):
                    self._exact_rows(keys, block_norm2, safe)
                self._examine(keys, block_norm2)
                return
            device = block_norm2.device
            rows_of: dict[int, list[int]] = defaultdict(list)  # group -> its rows of block_norm2
            for i, key in enumerate(keys):
                rows_of[self.groups.group_of[key[0]]].append(i)
            reached = sorted(rows_of)  # the groups with blocks to clip
            if len(reached) == 1:  # layer-wise clips one group at a time: no scatter needed; [n]
                reduce = lambda: block_norm2.sum(0) if len(keys) > 1 else norm2s[0]  # noqa: E731  (block_norm2 views it)
            elif len(reached) == len(keys):  # one block per group (param-wise): the blocks' rows, in group order
                order = [rows_of[k][0] for k in reached]
                reduce = lambda: block_norm2 if order == sorted(order) else block_norm2[order]  # noqa: E731
            else:
                row = {k: i for i, k in enumerate(reached)}
                owner = torch.tensor([row[self.groups.group_of[key[0]]] for key in keys], device=device)

                def reduce() -> Tensor:
                    out = torch.zeros(len(reached), block_norm2.shape[1], dtype=torch.float64, device=device)
                    return out.index_add_(0, owner, block_norm2)  # [groups reached, n]

            mask = self._mask if self._mask.device == device else self._mask.to(device)
            # float64 norms, then fp32 for the clipping function: a norm beyond fp32's range counts as non-finite.
            # One synchronisation for the usual case, in few operators: every group's norm finite, and every block
            # whose norm sums terms of both signs (its mass is not its value) with mass <= CANCELLATION_LIMIT x value
            # (no NaN). That implies every block _safe (every value and mass finite, none negative: no clamp needed);
            # a sum of squares (mass is value) that is not finite makes its group's norm non-finite.
            all_norms = reduce().sqrt().float()
            ok = (all_norms < math.inf).all()
            summed = [i for i, (m, v) in enumerate(zip(masses, norm2s)) if m is not v]  # norms that sum signed terms
            if summed:
                risk = torch.sub(
                    _rows([masses[i] for i in summed]), _rows([norm2s[i] for i in summed]), alpha=CANCELLATION_LIMIT
                )
                ok = ok & (risk <= 0).all()
            exact, finite = {}, bool(ok)
            if not finite:  # (after the clamp a norm is >= 0 or NaN, so `< inf` is the finiteness test)
                safe = _safe(block_norm2, _rows(masses))
                all_norms = reduce().clamp(min=0).sqrt().float()
                if not bool(safe.all()):
                    exact = self._exact_rows(keys, block_norm2, safe)
                    all_norms = reduce().clamp(min=0).sqrt().float()
                finite = bool((all_norms < math.inf).all())
            factors, dropped = {}, {}
            if str(self.config.clipping_function) in _BROADCASTING and finite:
                # every group at once (the built-in functions broadcast a column of thresholds)
                thresholds = [self.groups.clip_norms[k] for k in reached]
                column = torch.tensor(thresholds, device=device).view(-1, 1) if len(set(thresholds)) > 1 else None
                all_factors = clip_factors(
                    all_norms,  # [groups, n], or [n] for one group
                    mask,
                    clip_norm=thresholds[0] if column is None else column,  # on the norms' device
                    fn=self.config.clipping_function,
                    stability_constant=self.config.stability_constant,
                )
                factors = {reached[0]: all_factors} if len(reached) == 1 else dict(zip(reached, all_factors.unbind(0)))
            else:
                for k, norms in zip(reached, all_norms if len(reached) > 1 else [all_norms]):
                    bad = ~torch.isfinite(norms)  # padding rows copy a real example: they may be non-finite too
                    if bool(bad.any()):
                        self._non_finite(bad, mask, k)
                        dropped[k] = bad
                    factors[k] = clip_factors(
                        torch.where(bad, torch.zeros_like(norms), norms),
                        mask * ~bad,
                        clip_norm=self.groups.clip_norms[k],
                        fn=self.config.clipping_function,
                        stability_constant=self.config.stability_constant,
                    )
            keys_of: dict[str, list[tuple[str, int | None]]] = defaultdict(list)
            for key in keys:
                keys_of[key[0]].append(key)
            for name, param_keys in keys_of.items():  # each parameter once, in the order reached
                param = self.params[name]
                shape = full_shape(param)
                # None until the first block: a whole, contiguous first block becomes the sum itself (no zero fill and
                # no addition of the parameter's size).
                target: Tensor | None = self.summed.get(name) if self.sink is None else None
                k = self.groups.group_of[name]
                for key in param_keys:
                    contributions = self._contributions.pop(key)
                    if not last:  # (after the backward nothing reads what is held: backward() resets it all)
                        self._track(key)
                    f = factors[k]
                    if key in exact:  # these examples' blocks are added from their exact instantiation instead
                        rows = exact[key]
                        f = f.clone()
                        f[rows] = 0.0
                        kept = rows[factors[k][rows] != 0]  # padding, dropped examples: their blocks may be inf
                        target = _zeros(shape, param) if target is None else target
                        for chunk, blocks in _exact_chunks(contributions, kept):
                            block = torch.einsum("k,k...->...", factors[k][chunk].double(), blocks).float()
                            self._add_block(target, contributions[0].rows, block)
                    for c in contributions:
                        if key in vectors and k not in dropped and key not in exact:
                            block = vectors[key].clipped_sum(key, k, f)
                        else:
                            c = zero_rows(c, dropped[k]) if k in dropped else c  # 0 * inf would still be NaN
                            block = clipped_sum(c, f)
                        if target is None and c.rows is None and block.shape == shape and block.is_contiguous():
                            target = block
                        else:
                            target = _zeros(shape, param) if target is None else target
                            self._add_block(target, c.rows, block)
                target = _zeros(shape, param) if target is None else target
                if self.sink is None:
                    self.summed[name] = target
                self.seen.add(name)
                if self.sink is not None:
                    self._emitted.add(name)
                    self.sink(name, target)
                del target

    def _vector_blocks(self, keys: list[tuple[str, int | None]]) -> dict[tuple[str, int | None], VectorBlocks]:
        """The squared norms (into ``_norm2`` and ``_mass``) of the blocks among ``keys`` held as one per-example
        vector, taken together, a few MB of vectors at a time; returns, for each such block, where its clipped sum
        is taken from (none for a block alone)."""
        group_of = self.groups.group_of
        pending = sorted((key for key in keys if key in self._vectors), key=lambda key: group_of[key[0]])
        out: dict[tuple[str, int | None], VectorBlocks] = {}
        if len(pending) == 1:  # one block (layer-wise: a layer's bias): its own norm, and its sum by clipped_sum
            self._norm2[pending[0]], self._mass[pending[0]] = self_inner(self._vectors.pop(pending[0]))
            return out
        while pending:
            batch = [pending.pop(0)]
            size = self._vectors[batch[0]].shape.numel()
            while pending and size + self._vectors[pending[0]].shape.numel() <= _VECTOR_ELEMENTS_PER_ROW:
                size += self._vectors[pending[0]].shape.numel()
                batch.append(pending.pop(0))
            blocks = VectorBlocks(
                {key: self._vectors.pop(key) for key in batch}, {key: group_of[key[0]] for key in batch}
            )
            for key, norm2 in zip(batch, blocks.squared_norms()):
                self._norm2[key] = self._mass[key] = norm2  # a sum of squares: no cancellation (value = mass)
                out[key] = blocks
        return out

    def _examine(self, keys: list[tuple[str, int | None]], block_norm2: Tensor) -> None:
        """Probe: per parameter, each row's squared gradient norm and the rows' unclipped sum; then forget them."""
        assert self._probe is not None and self._mask is not None
        ones = torch.ones(self._mask.numel(), device=block_norm2.device)
        for key, norm2 in zip(keys, block_norm2):
            name = key[0]
            self._probe.norms[name] = norm2 + self._probe.norms[name] if name in self._probe.norms else norm2
            if name not in self._probe.sums:
                self._probe.sums[name] = torch.zeros(full_shape(self.params[name]), device=ones.device)
            for c in self._contributions.pop(key):
                self._add_block(self._probe.sums[name], c.rows, clipped_sum(c, ones))
            self._track(key)

    @staticmethod
    def _add_block(target: Tensor, rows: slice | None, block: Tensor) -> None:
        if rows is None:
            target += block
        else:
            target[rows] += block

    def _non_finite(self, bad: Tensor, mask: Tensor, group: int) -> None:
        """Apply ``config.non_finite`` to the examples whose norm in ``group`` is inf or NaN."""
        real = bad & mask.bool()
        if self.config.non_finite is NonFinitePolicy.RAISE and bool(real.any()):
            raise FloatingPointError(
                f"{int(real.sum())} example(s) of this physical batch have a non-finite gradient norm in clipping "
                f"group {group} (an fp16 overflow, log(0), ...). PrivacyConfig(non_finite='zero') drops such "
                "examples' contributions instead; under fp16, bf16 avoids most overflows."
            )
        self._dropped = real if self._dropped is None else self._dropped | real

    def refresh_params(self, model: nn.Module) -> None:
        """Re-read the trainable parameters by name (after a wrapper such as FSDP2 replaced the objects)."""
        current = dict(model.named_parameters())
        self.params = {name: current[name] for name in self.params}
        self._model = weakref.ref(model)

    def pop_summed(self) -> dict[str, Tensor]:
        """The clipped sums of the logical step so far (fp32, parameter-shaped), and reset."""
        summed, self.summed = self.summed, {}
        return summed


# Clipping functions that take a column of thresholds for a [groups, n] matrix of norms (functions.py)
_BROADCASTING = frozenset({ClippingFunction.ABADI.value, ClippingFunction.AUTOMATIC.value})


def _grad_off() -> contextlib.AbstractContextManager[Any]:
    """``torch.no_grad()``, or nothing where grad mode is off already (a tap's backward: a few us a call)."""
    return torch.no_grad() if torch.is_grad_enabled() else contextlib.nullcontext()


def _rows(vectors: list[Tensor]) -> Tensor:
    """[n] vectors -> [len(vectors), n] (a view for one)."""
    return vectors[0].unsqueeze(0) if len(vectors) == 1 else torch.stack(vectors)


def _safe(norm2: Tensor, mass: Tensor) -> Tensor:
    """Which squared norms fp32 cannot have got wrong: no cancellation (mass <= CANCELLATION_LIMIT x value) and no
    overflow (mass >= 0: a negative value fails the first test, a NaN both, an inf the second). [blocks, n] bool."""
    return (mass <= CANCELLATION_LIMIT * norm2) & (mass + norm2 < math.inf)


def _zeros(shape: torch.Size, param: Tensor) -> Tensor:
    return torch.zeros(shape, device=param.device, dtype=torch.float32)


def _exact_chunks(contributions: list[Contribution], rows: Tensor) -> Iterator[tuple[Tensor, Tensor]]:
    """The float64 gradient blocks of the examples ``rows`` of one block, a few examples at a time (~64 MB)."""
    size = max(1, (1 << 23) // max(1, contributions[0].shape.numel()))
    for start in range(0, rows.numel(), size):
        chunk = rows[start : start + size]
        yield chunk, exact_per_example(contributions, chunk)


def _expand_rows(value: Any, rows: int) -> Any:
    """A tensor with a batch dim of 1, expanded (a view) to ``rows``; anything else unchanged."""
    if isinstance(value, Tensor) and value.dim() > 0 and value.shape[0] == 1:
        return value.expand(rows, *value.shape[1:])
    return value


def _detached(value: Any) -> Any:
    return value.detach() if isinstance(value, Tensor) else value
