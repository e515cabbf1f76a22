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
import weakref
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.hooks import RemovableHandle

from lightning_dpzero.clipping import rules as _rules  # noqa: F401  (registers the built-in rules)
from lightning_dpzero.clipping.contributions import (
    Contribution,
    clipped_sum,
    full_shape,
    inner,
    self_inner,
    zero_rows,
)
from lightning_dpzero.clipping.fallback import functorch_rule
from lightning_dpzero.clipping.functions import clip_factors
from lightning_dpzero.clipping.registry import ClippingRule, UnsupportedLayerError, rule_for
from lightning_dpzero.clipping.styles import ClippingGroups, make_groups
from lightning_dpzero.config import NonFinitePolicy, PrivacyConfig

__all__ = ["ClippingEngine", "validate_model"]


@dataclass(eq=False)
class _Layer:
    path: str
    module: nn.Module
    rule: ClippingRule
    params: dict[str, str]  # attribute -> canonical parameter name (trainable only)
    groups: list[int] = field(default_factory=list)  # clipping groups its parameters belong to


def validate_model(
    model: nn.Module, *, functorch_fallback: bool = False
) -> tuple[list[_Layer], dict[str, nn.Parameter], dict[str, str]]:
    """Check that every trainable parameter belongs to a module with a clipping rule.

    Args:
        model: the module to privatise.
        functorch_fallback: modules without a rule get per-example gradients from ``torch.func`` instead of an
            error (never modules that mix examples, such as BatchNorm).

    Returns:
        The layers to hook, the trainable parameters by canonical name, and each parameter's owning module path.
    Raises:
        UnsupportedLayerError: naming the first module whose trainable parameters have no rule, and the fix.
    """
    canonical = {id(p): name for name, p in model.named_parameters() if p.requires_grad}
    layers: list[_Layer] = []
    owner: dict[str, str] = {}
    for path, module in model.named_modules():
        own = {attr: p for attr, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not own:
            continue
        try:
            rule = rule_for(module, path)
        except UnsupportedLayerError:
            if not functorch_fallback or isinstance(module, nn.modules.batchnorm._BatchNorm):
                raise
            rule = functorch_rule
        unknown = sorted(set(own) - {"weight", "bias"})
        if unknown and rule is not functorch_rule:
            raise UnsupportedLayerError(path, module, f"its parameter(s) {unknown} have no clipping rule")
        params = {attr: canonical[id(p)] for attr, p in own.items()}
        for name in params.values():
            owner.setdefault(name, path)
        layers.append(_Layer(path, module, rule, params))
    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    return layers, trainable, owner


class _Tap(torch.autograd.Function):
    """Identity on a module's output that hands the output gradient to the engine."""

    @staticmethod
    def forward(ctx: Any, output: Tensor, anchor: Tensor, engine: ClippingEngine, layer: _Layer, act: Tensor) -> Tensor:
        ctx.engine, ctx.layer, ctx.activation, ctx.version = engine, layer, act, act._version
        # A fresh tensor, not a view: downstream in-place ops (ReLU(inplace=True), x += ...) must stay legal.
        return output.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None, None, None]:
        if ctx.activation._version != ctx.version:
            raise RuntimeError(
                f"the input of module '{ctx.layer.path}' was modified in place after the module used it; "
                "per-example gradients need the value it saw. Avoid the in-place operation."
            )
        ctx.engine._receive(ctx.layer, ctx.activation, grad)
        ctx.activation = None
        return grad, None, None, None, None


_BROADCASTING_OPS = {
    torch.add, torch.sub, torch.mul, torch.div, torch.where, torch.lerp, torch.addcmul,
    Tensor.add, Tensor.add_, Tensor.__add__, Tensor.__radd__, Tensor.__iadd__,
    Tensor.sub, Tensor.sub_, Tensor.__sub__, Tensor.__rsub__, Tensor.__isub__,
    Tensor.mul, Tensor.mul_, Tensor.__mul__, Tensor.__rmul__, Tensor.__imul__,
    Tensor.div, Tensor.div_, Tensor.__truediv__, Tensor.__rtruediv__, Tensor.__itruediv__,
    Tensor.expand, Tensor.expand_as,
}  # fmt: skip


class _BroadcastGuard(TorchFunctionMode):
    """Refuses a hooked module's output being broadcast along a new leading dimension.

    That is the signature of a module applied to something shared by all examples (``wpe(torch.arange(T))``
    added to ``[n, T, D]`` token embeddings): its dim 0 is not the example dimension, so per-example gradients
    read from it would be wrong, silently so when T happens to equal n. Active for the first physical batch.
    """

    def __init__(self, tapped: weakref.WeakValueDictionary[int, Tensor], layers: dict[int, _Layer]) -> None:
        super().__init__()
        self.tapped, self.layers = tapped, layers
        self.error: UnsupportedLayerError | None = None  # raised when the forward ends: Tensor dunders would turn
        # a TypeError raised here into NotImplemented

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _BROADCASTING_OPS and isinstance(out, Tensor):
            for arg in (*args, *(kwargs or {}).values()):
                if isinstance(arg, Tensor) and self.tapped.get(id(arg)) is arg and arg.dim() < out.dim():
                    layer = self.layers[id(arg)]
                    self.error = self.error or UnsupportedLayerError(
                        layer.path,
                        layer.module,
                        f"its output {tuple(arg.shape)} is broadcast to {tuple(out.shape)}, so its dim 0 is not "
                        "the example dimension; feed it per-example inputs (e.g. wpe(pos.expand(n, T)))",
                    )
        return out


class ClippingEngine:
    """Per-example clipping for one model, by the style and function of ``config``.

    Args:
        model: the module whose trainable parameters are privatised; validated at construction.
        config: clip norm, style, groups, function and norm mode.
    """

    def __init__(self, model: nn.Module, config: PrivacyConfig) -> None:
        self.config = config
        self.layers, self.params, owner = validate_model(model, functorch_fallback=config.functorch_fallback)
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
        self.last_norm_modes: dict[str, str] = {}  # layer path -> "ghost" / "instantiate" / "direct", for tests
        self._handles: list[RemovableHandle] = []
        self._anchor: Tensor | None = None  # the scalar every tap of the physical batch being recorded takes
        self._recorded: Tensor | None = None  # the anchor of the last recorded physical batch, until its backward
        self._contributions: dict[tuple[str, int | None], list[Contribution]] = defaultdict(list)
        self._norm2: Tensor | None = None  # [K, n] squared per-group norms of the current physical batch
        self._mask: Tensor | None = None  # [n] of the physical batch being differentiated
        self._pending_taps: dict[int, int] = defaultdict(int)  # group -> taps recorded but not yet reported
        for layer in self.layers:
            layer.groups = sorted({self.groups.group_of[name] for name in layer.params.values()})
        self._guard: _BroadcastGuard | None = None
        self._guarded_once = False
        # Examples whose contribution (to some clipping group) was dropped as non-finite. Not private: a count of
        # the data owner's examples, for diagnostics; it is never logged by the library.
        self.non_finite_examples = 0
        self._dropped: Tensor | None = None  # [n] of the physical batch being differentiated

    # ----------------------------------------------------------------------------------------------- hooks
    def attach(self) -> None:
        """Register the forward hooks (idempotent)."""
        if self._handles:
            return
        for layer in self.layers:
            self._handles.append(layer.module.register_forward_hook(self._forward_hook(layer)))
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

    def _forward_hook(self, layer: _Layer):
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if self._anchor is None or not torch.is_grad_enabled():
                return None
            if not isinstance(output, Tensor) or not output.requires_grad:
                return None
            if not args or not isinstance(args[0], Tensor):
                raise UnsupportedLayerError(
                    layer.path, module, "its input must be passed positionally as a tensor (e.g. layer(x))"
                )
            tapped = _Tap.apply(output, self._anchor, self, layer, args[0].detach())
            for k in layer.groups:
                self._pending_taps[k] += 1
            if self._guard is not None:
                self._guard.tapped[id(tapped)] = tapped
                self._guard.layers[id(tapped)] = layer
            return tapped

        return hook

    @contextlib.contextmanager
    def recording(self, device: torch.device) -> Iterator[None]:
        """Within this block, forward passes of hooked modules are recorded for one physical batch."""
        self._anchor = torch.zeros((), device=device, requires_grad=True)
        self._recorded = None
        guard = contextlib.nullcontext()
        if not self._guarded_once:
            self._guard = _BroadcastGuard(weakref.WeakValueDictionary(), {})
            guard = self._guard
        try:
            with guard:
                yield
            if self._guard is not None and self._guard.error is not None:
                raise self._guard.error
            self._guarded_once = True
        finally:
            self._recorded, self._anchor, self._guard = self._anchor, None, None

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
                torch.autograd.grad(loss, [anchor], allow_unused=True)
            self._finalize(range(len(self.groups)))  # groups whose taps did not all report (or all-layer)
            if self.sink is not None:
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
            self._norm2 = None

    def _receive(self, layer: _Layer, activation: Tensor, grad_output: Tensor) -> None:
        """Called from a tap's backward: this call's contributions and their squared norms."""
        n = None if self._mask is None else self._mask.numel()
        if n is not None and (grad_output.dim() == 0 or grad_output.shape[0] != n):
            raise UnsupportedLayerError(
                layer.path,
                layer.module,
                f"its output has shape {tuple(grad_output.shape)}, but per-example clipping needs the "
                f"{n} examples of the physical batch in dim 0 of every hooked module's input and "
                "output. A module applied to something shared by all examples (e.g. wpe(torch.arange(T))) must "
                "see it expanded per example (wpe(pos.expand(n, T)))",
            )
        with torch.no_grad():
            for c in layer.rule(layer.module, activation, grad_output, layer.params):
                c.choose_norm_mode(self.config.norm_mode)
                if c.instantiated is not None:
                    self.last_norm_modes[layer.path] = "instantiate"
                elif c.left is not None and c.left.dim() == 3 and c.left.shape[1] > 1:
                    self.last_norm_modes.setdefault(layer.path, "ghost")
                else:
                    self.last_norm_modes.setdefault(layer.path, "direct")
                norm2 = self_inner(c)
                key = (c.param, None if c.rows is None else c.rows.start)
                for previous in self._contributions[key]:  # the same parameter used again: cross terms
                    norm2 = norm2 + 2.0 * inner(previous, c)
                self._contributions[key].append(c)
                if self._norm2 is None:
                    self._norm2 = torch.zeros(len(self.groups), norm2.shape[0], device=norm2.device)
                self._norm2[self.groups.group_of[c.param]] += norm2
            # A group is final once every tap that feeds it has reported: clip it now and free its activations
            # and output gradients (layer-, param- and group-wise clipping peak lower than all-layer; 2310.19215).
            if len(self.groups) > 1:
                done = []
                for k in layer.groups:
                    self._pending_taps[k] -= 1
                    if self._pending_taps[k] == 0:
                        done.append(k)
                self._finalize(done)

    def _finalize(self, groups: Iterable[int]) -> None:
        """Clip factors of ``groups`` from their norms; add their clipped sums to ``summed``; free them."""
        groups = set(groups)
        if self._norm2 is None or not groups:
            return
        assert self._mask is not None
        with torch.no_grad():
            mask = self._mask.to(self._norm2.device)
            norms = self._norm2.clamp(min=0).sqrt()  # [K, n]; cross terms can round a hair below zero
            factors, dropped = {}, {}
            for k in groups:
                bad = ~torch.isfinite(norms[k])  # padding rows copy a real example: they may be non-finite too
                if bool(bad.any()):
                    self._non_finite(bad, mask, k)
                    dropped[k] = bad
                factors[k] = clip_factors(
                    torch.where(bad, torch.zeros_like(norms[k]), norms[k]),
                    mask * ~bad,
                    clip_norm=self.groups.clip_norms[k],
                    fn=self.config.clipping_function,
                    stability_constant=self.config.stability_constant,
                )
            keys = [key for key in self._contributions if self.groups.group_of[key[0]] in groups]
            for name in dict.fromkeys(key[0] for key in keys):  # each parameter once, in the order reached
                param = self.params[name]
                target = self.summed.get(name) if self.sink is None else None
                if target is None:
                    target = torch.zeros(full_shape(param), device=param.device, dtype=torch.float32)
                    if self.sink is None:
                        self.summed[name] = target
                k = self.groups.group_of[name]
                for key in [key for key in keys if key[0] == name]:
                    for c in self._contributions.pop(key):
                        if k in dropped:
                            c = zero_rows(c, dropped[k])  # 0 * inf would still be NaN
                        block = clipped_sum(c, factors[k])
                        if c.rows is None:
                            target += block
                        else:
                            target[c.rows] += block
                self.seen.add(name)
                if self.sink is not None:
                    self._emitted.add(name)
                    self.sink(name, target)
                del target

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

    def pop_summed(self) -> dict[str, Tensor]:
        """The clipped sums of the logical step so far (fp32, parameter-shaped), and reset."""
        summed, self.summed = self.summed, {}
        return summed
