"""The per-example self-check: the clipping engine's assumptions, verified by behaviour on real physical batches.

Per-example clipping bounds one example's influence only if (1) row i of every hooked module's input, output and
output gradient belongs to example i alone, (2) example i's loss depends on row i only, and (3) the rows are
where the padding mask says they are. Shapes cannot show any of this (a reordering of rows, a ``x - x.mean(0)``, a
loss normalised over the whole batch all have the right shapes), so the check runs the user's
``training_step`` on a physical batch and on the same batch with one example replaced by another one of the dataset,
and requires that nothing else moves:

- (a) every other row of every hooked module's input, output and output gradient, and every other per-example loss,
  is unchanged (to rounding) when one example changes;
- (b) the engine's per-example gradient norms of two rows equal autograd's gradient of those rows' own losses
  (a scalar loss: the engine's unclipped sum equals autograd's gradient), parameter by parameter; this catches a
  parameter also used outside its module (``F.linear(x, self.fc.weight)``) or a rule that does not match its
  module. It needs whole parameters on the rank, so it runs under ``dp``, ``dp_ddp`` and ``dp_zero1/2``; under
  ``dp_zero3`` and ``dp_fsdp`` (sharded parameters) only (a) runs;
- buffers: a buffer that a training forward writes from the data (running statistics) would be released without
  noise; one whose new value differs between the two batches is refused.

A failed check refuses the run (on every rank), naming the first module, loss or buffer at fault and the fix.

Privacy:
    The check reads one example beyond the sample (the replacement) and its outcome depends on the data only for a
    model that is not per-example; for such a model the run stops before the step that would have released
    un-bounded gradients. ``training_step`` runs a few more times on the checked batch, with ``self.log`` and
    torchmetrics updates suppressed and the RNG restored, and nothing it computes reaches the weights.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from lightning_dpzero.clipping.engine import ClippingEngine, Probe, explain_reentrant_checkpointing
from lightning_dpzero.loss import summed_loss

__all__ = ["PerExampleCheckError", "SelfCheck"]


class PerExampleCheckError(ValueError):
    """The model or its loss is not per-example: per-example clipping would not bound one example's influence."""


@dataclass
class _Observation:
    """One probed forward (and backward) of the check: what the engine and the loss showed."""

    probe: Probe | None  # None: zeroth-order (no taps)
    losses: Tensor | None  # [p] per-example losses, or None for a scalar loss
    reference: dict[str, Tensor] | None  # (b): parameter name -> autograd's gradient norm per checked row, or sum
    buffers: dict[str, Tensor]  # every buffer after the forward


_FIXES = (
    "Keep every operation per example: no statistics or attention across dim 0 (use GroupNorm / LayerNorm instead "
    "of batch statistics), examples in one dim of every module's input (moved there by transposes, not by "
    "reshapes that interleave them with positions), rows in the order they arrive, and return "
    "per-example losses of shape [p] from training_step (e.g. {'loss': losses.mean(), 'per_example_loss': losses})."
)


class SelfCheck:
    """Runs the check on the first logical step of a run and every ``every`` logical steps after.

    The check runs on the first ``ROWS`` rows of the step's first physical batch (all of them when it has fewer):
    mixing across rows shows with two, and the check holds two probed passes (every hooked module's input, output
    and output gradient) at once, so its memory is kept to that of a few rows whatever p is. A layout the engine
    took for examples-first when it is not is refused at any number of rows: either the shapes differ or every row
    moves with the one changed example.

    Args:
        every: logical steps between checks; ``None``: the first step only.
    """

    ROWS = 8

    def __init__(self, every: int | None) -> None:
        self.every = every
        self.last_step: int | None = None
        self.running = False  # True while the check's extra forwards run (hooks can tell them apart)
        self.seconds: list[float] = []  # wall time of each check (not private: no data in it)

    def due(self, step: int) -> bool:
        return self.last_step is None or (self.every is not None and step - self.last_step >= self.every)

    def run(
        self,
        *,
        module: nn.Module,
        engine: ClippingEngine | None,
        batches: Callable[[int | None], Any],
        forward: Callable[[Any], Any],
        context: Callable[[], contextlib.AbstractContextManager[Any]],
        device: torch.device,
        loss_of: Callable[[Any], Tensor],
        parameter_reference: bool,
        rows: int,
        step: int,
    ) -> str | None:
        """Check one physical batch; the failure message, or ``None``.

        Args:
            module: the LightningModule.
            engine: the clipping engine (first-order), or ``None`` (zeroth-order: losses and buffers only).
            batches: ``batches(None)`` is the physical batch on the device; ``batches(j)`` the same batch with row j
                (``rows // 2``) replaced by another example of the dataset.
            forward: runs ``training_step`` on a physical batch (in the strategy's own way) and returns its output.
            context: the strategy's context around one probed physical batch.
            device: where the probes record.
            loss_of: ``training_step``'s output -> its loss (a scalar or [p]).
            parameter_reference: whether parameters are whole on this rank (check (b)).
            rows: p, the rows of the physical batch.
            step: the logical step, for ``due``.
        """
        import time

        from lightning_dpzero.clipping.registry import UnsupportedLayerError

        start = time.perf_counter()
        self.last_step, self.running = step, True
        try:
            with _quiet(module), _fixed_randomness(device) as reset:
                snapshot = {name: b.detach().clone() for name, b in module.named_buffers()}
                observations = []
                changed = rows // 2  # a middle row: code that reads one fixed row (e.g. [0]) of a batch shows up too
                for row, reference in ((None, parameter_reference), (changed, False)):  # as sampled; one replaced
                    reset()
                    try:
                        observations.append(
                            self._observe(module, engine, batches(row), forward, context, device, loss_of, reference,
                                          rows)
                        )  # fmt: skip
                    finally:
                        _restore(module, snapshot)
        except UnsupportedLayerError as err:  # e.g. a tapped tensor whose dim 0 is not the p rows
            self.seconds.append(time.perf_counter() - start)
            return str(err)
        finally:
            self.running = False
        original, replaced = observations
        try:
            return (
                _compare_rows(original, replaced, changed=changed, rows=rows)
                or _compare_reference(original, engine)
                or _compare_buffers(snapshot, original, replaced)
            )
        finally:
            self.seconds.append(time.perf_counter() - start)  # the comparisons included

    def _observe(
        self,
        module: nn.Module,
        engine: ClippingEngine | None,
        batch: Any,
        forward: Callable[[Any], Any],
        context: Callable[[], contextlib.AbstractContextManager[Any]],
        device: torch.device,
        loss_of: Callable[[Any], Tensor],
        reference: bool,
        p: int,
    ) -> _Observation:
        if engine is None:  # zeroth-order: forward passes only, in eval mode as its differences are taken
            with torch.no_grad(), eval_mode(module), context():
                loss = loss_of(forward(batch)).detach()
            buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
            return _Observation(None, loss if loss.dim() == 1 else None, None, buffers)
        with context(), engine.probing() as probe:
            with engine.recording(device, rows=p):
                loss = loss_of(forward(batch))
            total = summed_loss(loss, p)
            losses = loss if loss.dim() == 1 else None
            norms = None
            if reference:
                with engine.passive(), explain_reentrant_checkpointing():
                    norms = _reference_gradients(engine, losses, total)
            engine.backward(total, torch.ones(p, dtype=torch.bool, device=loss.device))
        buffers = {name: b.detach().clone() for name, b in module.named_buffers()}
        return _Observation(probe, None if losses is None else losses.detach(), norms, buffers)


# ------------------------------------------------------------------------------------------------- (b) reference
_REFERENCE_ROWS = (0, 1)


def _reference_gradients(engine: ClippingEngine, losses: Tensor | None, total: Tensor) -> dict[str, Tensor]:
    """Autograd's gradients, with the forward's graph kept for the engine's backward after.

    Per-example losses: for each checked row j, the norm of grad(l_j) per parameter -> {name: [rows] float64}.
    A scalar loss: grad(total) per parameter (the sum over rows) -> {name: tensor}.
    """
    names = list(engine.params)
    params = [engine.params[name] for name in names]
    if losses is None:
        grads = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)
        return {n: (torch.zeros_like(p) if g is None else g.detach()) for n, p, g in zip(names, params, grads)}
    out: dict[str, list[Tensor]] = {name: [] for name in names}
    for j in _REFERENCE_ROWS[: losses.shape[0]]:
        grads = torch.autograd.grad(losses[j], params, retain_graph=True, allow_unused=True)
        for name, g in zip(names, grads):
            out[name].append(torch.zeros((), dtype=torch.float64) if g is None else g.detach().double().norm().cpu())
    return {name: torch.stack(values) for name, values in out.items()}


def _compare_reference(original: _Observation, engine: ClippingEngine | None) -> str | None:
    if original.reference is None or original.probe is None or engine is None:
        return None
    probe = original.probe
    low_precision = any(t.output.dtype in (torch.float16, torch.bfloat16) for t in probe.taps)
    rtol = 5e-2 if low_precision else 1e-3
    mismatches = []
    if original.losses is not None:  # per-row norms of each parameter's gradient
        scale = max((float(v.max()) for v in original.reference.values()), default=0.0)
        for name, expected in original.reference.items():
            got = probe.norms.get(name)
            got = torch.zeros_like(expected) if got is None else got[: expected.numel()].clamp(min=0).sqrt().cpu()
            if bool(((got - expected).abs() > rtol * expected + 1e-6 * scale).any()):
                mismatches.append((name, f"rows {list(_REFERENCE_ROWS[: expected.numel()])}: engine {_fmt(got)}, "
                                         f"autograd {_fmt(expected)}"))  # fmt: skip
    else:  # the sum over rows of each parameter's gradient
        scale = max((float(g.norm()) for g in original.reference.values()), default=0.0)
        for name, expected in original.reference.items():
            got = probe.sums.get(name)
            got = torch.zeros_like(expected) if got is None else got.to(expected.device, expected.dtype)
            err = float((got - expected).norm())
            if err > rtol * float(expected.norm()) + 1e-6 * scale:
                mismatches.append((name, f"|engine - autograd| = {err:.3g}, |autograd| = {float(expected.norm()):.3g}"))
    if not mismatches:
        return None
    name, detail = mismatches[0]
    path = engine.owner.get(name, "?")
    return (
        f"parameter '{name}' (module '{path or '<root>'}'): the per-example gradient the engine computed from its "
        f"module's calls differs from autograd's ({detail}). The parameter is used outside its module (e.g. "
        f"F.linear(x, self.{name}) next to the module's own call; call the module instead), or a clipping rule "
        "registered for its module does not match the module's forward."
    )


def _fmt(values: Tensor) -> str:
    return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"


# ------------------------------------------------------------------------------------------ (a) rows and buffers
def _compare_rows(original: _Observation, replaced: _Observation, *, changed: int, rows: int) -> str | None:
    """The first module (or the loss) whose other rows moved when only row ``changed`` of ``rows`` did."""
    if original.probe is not None and replaced.probe is not None:
        a, b = original.probe.taps, replaced.probe.taps
        if len(a) != len(b):
            return (
                f"the model made {len(a)} hooked module calls on a physical batch and {len(b)} when one example of it "
                "changed: its computation depends on the data in a way per-example clipping cannot follow. " + _FIXES
            )
        moved_gradient = None  # the last module (in forward order) whose output gradient moved
        for first, second in zip(a, b):
            for what, x, y in (
                ("input", first.activation, second.activation),
                ("output", first.output, second.output),
                ("output gradient", first.grad, second.grad),
            ):
                if x is None or y is None:
                    continue
                if x.shape == y.shape and x.dim() > 0 and x.shape[0] != rows and x.shape[0] % rows == 0:
                    x, y = x.reshape(rows, -1), y.reshape(rows, -1)  # rows flattened to [p * k, ...], as the engine
                if x.shape != y.shape or x.dim() == 0 or x.shape[0] != rows:
                    return (
                        f"module '{first.path}': its {what} has shape {tuple(x.shape)} (and {tuple(y.shape)} when "
                        f"one example changed); dim 0 must be the {rows} examples of the physical batch. " + _FIXES
                    )
                if not _others_moved(x, y, changed):
                    continue
                if what == "output gradient":
                    moved_gradient = first.path
                    continue
                return (
                    f"module '{first.path}': rows of its {what} other than the changed example's moved when only one "
                    "example of the physical batch changed: the model mixes examples at or before this module "
                    "(statistics or attention across dim 0, a reordering of rows), or the examples are not where the "
                    "engine followed them (a reshape that interleaves them with positions). Per-example clipping "
                    "would not bound one example's influence. " + _FIXES
                )
        if moved_gradient is not None:
            return (
                f"module '{moved_gradient}': rows of its output gradient other than the changed example's moved when "
                "only one example of the physical batch changed: its dim 0 is not the example (a module applied to "
                "something shared by all examples, e.g. positions computed once as wpe(arange(T))), or a computation "
                "between this module and the loss mixes examples, or the loss does (e.g. a loss normalised over the "
                "whole batch, such as a token mean with ignore_index over all rows). Per-example clipping would not "
                "bound one example's influence. A module called on something computed from no example data "
                "(positions, a relative position bias) gets per-example gradients where its output meets the "
                "examples through a broadcasting op (+, *, where, matmul, an attention mask); if it reaches them "
                "otherwise (through a function lightning_dpzero cannot follow, or from values read back into "
                f"Python), freeze it: get_submodule('{moved_gradient}').requires_grad_(False) on the LightningModule "
                "(it then keeps its initial or pretrained values and needs no per-example gradient). " + _FIXES
            )
    if (
        original.losses is not None
        and replaced.losses is not None
        and _others_moved(original.losses, replaced.losses, changed)
    ):
        return (
            "training_step's per-example losses: losses of other examples moved when only one example of the "
            "physical batch changed: each loss must depend on its own example alone. " + _FIXES
        )
    return None


def _others_moved(x: Tensor, y: Tensor, changed: int) -> bool:
    """Whether any row but ``changed`` differs beyond rounding (relative to the tensor's scale)."""
    if x.dtype == y.dtype and torch.equal(x[:changed], y[:changed]) and torch.equal(x[changed + 1 :], y[changed + 1 :]):
        return False  # the usual case, in one pass over views (a NaN is unequal to itself: it takes the test below)
    keep = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    keep[changed] = False
    a, b = x[keep].float(), y[keep].float()
    same = (a == b) | (torch.isnan(a) & torch.isnan(b))
    if bool(same.all()):
        return False
    low_precision = x.dtype in (torch.float16, torch.bfloat16)
    finite = torch.isfinite(a) & torch.isfinite(b)
    if bool((~same & ~finite).any()):
        return True
    scale = max(float(x.float().abs().nan_to_num(0, 0, 0).max()), float(y.float().abs().nan_to_num(0, 0, 0).max()))
    return float((a - b)[finite].abs().max()) > (1e-3 if low_precision else 1e-5) * scale


def _compare_buffers(snapshot: dict[str, Tensor], original: _Observation, replaced: _Observation) -> str | None:
    """A buffer the forward wrote from the data: different after the two batches."""
    for name, before in snapshot.items():
        first, second = original.buffers[name], replaced.buffers[name]
        if torch.equal(first, before) and torch.equal(second, before):
            continue
        if not torch.equal(first, second):
            module = name.rpartition(".")[0] or "<root>"
            return (
                f"buffer '{name}' (module '{module}') is written from the data in a training forward (e.g. running "
                "statistics): its value would be released with the weights without noise, a leak that clipping does "
                "not bound. Stop updating it in training (InstanceNorm / custom norms: track_running_stats=False), "
                "or make it a constant."
            )
    return None


# ------------------------------------------------------------------------------------------------- side effects
def _restore(module: nn.Module, snapshot: dict[str, Tensor]) -> None:
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(snapshot[name])


@contextlib.contextmanager
def _fixed_randomness(device: torch.device) -> Iterator[Callable[[], None]]:
    """Every probe starts from the same RNG state (the same dropout masks); the run's RNG is left as it was."""
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        cpu = torch.get_rng_state()
        accel = torch.cuda.get_rng_state(device) if devices else None

        def reset() -> None:
            torch.set_rng_state(cpu)
            if accel is not None:
                torch.cuda.set_rng_state(accel, device)

        yield reset


@contextlib.contextmanager
def _quiet(module: nn.Module) -> Iterator[None]:
    """``self.log`` does nothing, and torchmetrics' states (updated in training_step) come back as they were."""
    from torchmetrics import Metric

    metrics = [m for m in module.modules() if isinstance(m, Metric)]
    saved = [(m, {k: copy.deepcopy(getattr(m, k)) for k in m._defaults}, m._update_count, m._computed) for m in metrics]
    # LightningModule.log/log_dict shadowed on this instance (deleted below); typed as nn.Module, whose attributes
    # mypy reads through __getattr__ (Tensor | Module)
    module.log = lambda *args, **kwargs: None  # type: ignore[assignment]
    module.log_dict = lambda *args, **kwargs: None  # type: ignore[assignment]
    try:
        yield
    finally:
        del module.log, module.log_dict
        for metric, states, count, computed in saved:
            for key, value in states.items():
                setattr(metric, key, value)
            metric._update_count, metric._computed = count, computed


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Every module in eval mode (dropout off) inside the block; each module's own mode restored after (zeroth-order
    takes its +- differences this way, and its check runs the same way)."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, mode in modes.items():
            module.training = mode
