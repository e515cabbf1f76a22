"""Step time and peak memory of one DP-SGD step: non-private vs lightning_dpzero's clipping styles vs Opacus.

Commands::

    python examples/benchmarks/step_time.py                                  # gpt, cnn, mlp; CPU; 3 burn-in + 25 timed
    python examples/benchmarks/step_time.py --models gpt --steps 30          # one model, more timed steps
    python examples/benchmarks/step_time.py --models cnn,mlp --burn-in 5
    python examples/benchmarks/step_time.py --device cuda --steps 50         # GPU (peak memory from the CUDA allocator)
    python examples/benchmarks/step_time.py --precision bf16-mixed           # every mode's forward under bf16 autocast
    python examples/benchmarks/step_time.py --models hf_gpt2                 # transformers' GPT-2 (the hf extra)

Every mode runs in this one process on a deep copy of the same initial model and on the same physical batch
(which is also the logical batch: B = p). The optimizer is AdamW in every mode. Modes:

- ``non-private``: ``mean(per-example losses).backward()``, ``opt.step()``.
- ``ours <style>``: what the DP strategies do per physical batch: ``ClippingEngine.recording`` around the forward,
  ``engine.backward(sum of per-example losses, mask)``, then the single-device strategy's release
  (``LocalReducer.release`` with a ``PrivacyLedger``): the clipped sums in one flat buffer, noise N(0, sigma^2 C^2)
  from the ledger's keyed streams (AES-256 in counter mode and Box-Muller, ~2.5-3 ns per coordinate on one core),
  division by B, the step's accounting event, ``opt.step()`` (sigma = 1, C = 1, the default clipping function).
  ``group-wise`` asks for 4 groups (fewer where the model has fewer modules); each row shows its number of groups.
- ``Opacus hooks`` / ``Opacus ghost``: ``PrivacyEngine.make_private`` (sigma = 1, max_grad_norm = 1, no Poisson
  sampling) with ``grad_sample_mode="hooks"`` (per-example gradients) or ``"ghost"`` (ghost clipping: two backward
  passes; the loss is built by the returned criterion, per example: for the GPT the token losses are averaged per
  row, through ``criterion(..., shape=logits.shape)``, as in our per-example loss). Opacus draws its noise from
  torch's default generator (its ``secure_mode=False`` default: ~3-4 ns per coordinate, a Mersenne Twister whose
  state its outputs reveal).

The GPT ties its output head to the token embedding. Opacus's hooks mode handles that (it adds the per-example
gradients of both uses); its ghost mode refuses it ("Parameter tying is not supported with Ghost Clipping"), and the
table shows that refusal. So ghost mode also runs on an untied copy (the head gets its own copy of the weight: one
more V x D matrix), next to an ``ours all-layer (untied copy)`` row on the same copy; ``ours / Opacus best`` in the
summary compares ours with Opacus on the same variant of the model. Opacus's ghost embedding norm sampler also
calls ``.view`` on the index tensor, which fails on the GPT's expanded (non-contiguous) position ids, so in
Opacus's ghost runs a forward pre-hook on each ``nn.Embedding`` makes its input contiguous (a copy of [p, T]
integers; the model's code is unchanged).

Measures:

- ``step ms``: the median wall time of ``--steps`` steps, after ``--burn-in`` untimed steps
  (``torch.cuda.synchronize`` on CUDA). All modes of a model are built, then timed interleaved (one step of each
  mode in turn), so that the slow spells of a shared machine fall on every mode alike; the garbage collector is off
  while timing. This is repeated ``--rounds`` times (every mode rebuilt): the table gives the median over the rounds
  and the range of each round's ratio to non-private. The min and max per mode and round go to stderr.
- ``peak MB`` = the mode's static memory (its parameters, AdamW state and the batch, counted tensor by tensor) +
  ``step working MB``: the peak of tensor memory allocated during one step (after the timed ones) above what was
  allocated when that step began; gradients are freed before it, so they count. Measured per step because every
  mode of a model is alive at once (see ``step ms``), so a process-wide peak would mix them. On CUDA the working
  memory is ``max_memory_allocated()`` minus ``memory_allocated()`` at the start of the step. The CPU allocator keeps
  no statistics, so on CPU the step runs once under ``torch.profiler`` with ``profile_memory=True`` and the peak is
  the running sum of its allocation and free events. That sees every tensor PyTorch allocates (not memory that
  libraries such as oneDNN allocate for themselves, nor allocator overhead), where process RSS would be blurred by
  the heap glibc retains between modes. A block allocated before the step and freed during it has no size in the
  profile (PyTorch warns "Memory block of unknown size"): that free is missed, which can only overstate a peak.
  ``gc.collect()`` (and on CUDA ``empty_cache``) runs before each mode's memory step.

On CPU every mode runs with freed memory retained in the process (``lightning_dpzero.retain_freed_memory``, as the
main job runs; ``--allocator glibc`` keeps the C library's defaults, under which a step's large tensors may come from
fresh pages, faulted in one by one).

Ratios are judged against the project's targets: DP / non-DP step time <= 1.15 (GPT-style transformers, T >= 128)
and <= 1.35 (CNN with GroupNorm); DP / non-DP peak memory <= 1.2 (judged on ``peak MB``; the stricter ratio of
working memory alone is printed beside it); ours / Opacus's fastest mode <= 0.6. "DP" in the summaries is the
default style, all-layer. No time target is set for the MLP; its ratio is printed for information.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpzero.allocator import retain_freed_memory
from lightning_dpzero.clipping import ClippingEngine
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.ledger import PrivacyLedger
from lightning_dpzero.strategies.reducers import LocalReducer
from lightning_dpzero.tasks.gpt import GPT, GPTConfig

SIGMA, CLIP = 1.0, 1.0
STYLES = ("all-layer", "layer-wise", "param-wise", "group-wise")
TARGETS = {"gpt": 1.15, "cnn": 1.35, "hf_gpt2": 1.15}  # DP / non-DP step time (the project's performance targets)
MEMORY_TARGET, OPACUS_TARGET = 1.2, 0.6


# ------------------------------------------------------------------------------------------------------ models
@dataclass
class Bench:
    """A model, one physical batch, and its per-example losses (and Opacus's criterion form of them)."""

    name: str
    title: str
    model: nn.Module
    batch: tuple[Tensor, Tensor]
    per_example_losses: Callable[[nn.Module, tuple[Tensor, Tensor]], Tensor]  # -> [p]
    ghost_loss: Callable[[Callable, nn.Module, tuple[Tensor, Tensor]], object]  # Opacus criterion -> DP loss


def _class_losses(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


def _class_ghost(criterion: Callable, model: nn.Module, batch: tuple[Tensor, Tensor]) -> object:
    x, y = batch
    return criterion(model(x), y)


def _token_losses(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch  # [p, T] each
    return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)  # token mean per row: [p]


def _token_ghost(criterion: Callable, model: nn.Module, batch: tuple[Tensor, Tensor]) -> object:
    x, y = batch
    logits = model(x)  # [p, T, V]
    # With `shape`, Opacus reshapes the [p*T] token losses to [p, T] and averages each row: the same per-example
    # loss as _token_losses, and the privacy unit is the sequence.
    return criterion(logits.flatten(0, 1), y.flatten(), shape=logits.shape)


def make_gpt(device: torch.device) -> Bench:
    cfg = GPTConfig(vocab_size=64, block_size=128, n_layer=2, n_head=4, n_embd=128)
    p, gen = 16, torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (p, cfg.block_size + 1), generator=gen)
    batch = (tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device))
    title = f"gpt (T={cfg.block_size}, D={cfg.n_embd}, {cfg.n_layer} layers, V={cfg.vocab_size}, tied head), p={p}"
    return Bench("gpt", title, GPT(cfg).to(device), batch, _token_losses, _token_ghost)


class GroupNormCNN(nn.Module):
    """3 conv layers (32-64-128 channels) with GroupNorm and ReLU, global average pooling, linear head."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def make_cnn(device: torch.device) -> Bench:
    p, gen = 32, torch.Generator().manual_seed(2)
    batch = (torch.randn(p, 3, 32, 32, generator=gen).to(device), torch.randint(0, 10, (p,), generator=gen).to(device))
    title = f"cnn (32x32x3, conv 32-64-128 + GroupNorm(8), ReLU, avg pool, linear), p={p}"
    return Bench("cnn", title, GroupNormCNN().to(device), batch, _class_losses, _class_ghost)


def make_mlp(device: torch.device) -> Bench:
    p, gen = 64, torch.Generator().manual_seed(3)
    model = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    batch = (torch.randn(p, 784, generator=gen).to(device), torch.randint(0, 10, (p,), generator=gen).to(device))
    return Bench("mlp", f"mlp (784-512-512-10), p={p}", model.to(device), batch, _class_losses, _class_ghost)


def _hf_losses(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch  # [p, T]
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)  # per example: what Opacus's hooks need
    logits = model(input_ids=x, position_ids=positions).logits
    return F.cross_entropy(logits.transpose(1, 2), y, reduction="none").mean(1)


def _hf_ghost(criterion: Callable, model: nn.Module, batch: tuple[Tensor, Tensor]) -> object:
    x, y = batch
    positions = torch.arange(x.shape[1], device=x.device).expand_as(x)
    logits = model(input_ids=x, position_ids=positions).logits
    return criterion(logits.flatten(0, 1), y.flatten(), shape=logits.shape)


def make_hf_gpt2(device: torch.device) -> Bench:
    """transformers' GPT2LMHeadModel (Conv1D layers, a tied head), the same sizes as ``gpt``; needs the hf extra."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=64, n_positions=128, n_embd=128, n_layer=2, n_head=4, attn_pdrop=0.0, embd_pdrop=0.0,
                     resid_pdrop=0.0, bos_token_id=None, eos_token_id=None)  # fmt: skip
    p, gen = 16, torch.Generator().manual_seed(4)
    tokens = torch.randint(0, cfg.vocab_size, (p, cfg.n_positions + 1), generator=gen)
    batch = (tokens[:, :-1].contiguous().to(device), tokens[:, 1:].contiguous().to(device))
    title = f"hf_gpt2 (transformers GPT2LMHeadModel, T=128, D=128, 2 layers, V=64, tied head), p={p}"
    return Bench("hf_gpt2", title, GPT2LMHeadModel(cfg).to(device), batch, _hf_losses, _hf_ghost)


MODELS = {"gpt": make_gpt, "cnn": make_cnn, "mlp": make_mlp, "hf_gpt2": make_hf_gpt2}


def tied_names(model: nn.Module) -> list[str]:
    """Names under which an already-seen parameter is registered again (tied weights)."""
    seen: set[int] = set()
    tied = []
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.append(name)
        seen.add(id(p))
    return tied


def untied_copy(model: nn.Module) -> nn.Module:
    """A copy in which every second use of a parameter gets its own copy of the weight (same values)."""
    model = copy.deepcopy(model)
    for name in tied_names(model):
        path, _, attr = name.rpartition(".")
        module = model.get_submodule(path)
        setattr(module, attr, nn.Parameter(getattr(module, attr).detach().clone()))
    return model


# ------------------------------------------------------------------------------------------------------- modes
@dataclass
class Mode:
    step: Callable[[], None]
    optimizer: torch.optim.Optimizer
    cleanup: Callable[[], None] = lambda: None
    note: str = ""  # shown after the mode's label


PRECISION = "32-true"  # --precision; every mode runs its forward under the same autocast


def _autocast(bench: Bench) -> contextlib.AbstractContextManager:
    """bf16-mixed: what DPPrecision("bf16-mixed") and Lightning's MixedPrecision do around the forward."""
    if PRECISION == "32-true":
        return contextlib.nullcontext()
    return torch.autocast(bench.batch[0].device.type, dtype=torch.bfloat16, cache_enabled=False)


def optimizer_for(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=1e-4)


def non_private(bench: Bench, model: nn.Module) -> Mode:
    opt = optimizer_for(model)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(bench):
            loss = bench.per_example_losses(model, bench.batch).mean()
        loss.backward()
        opt.step()

    return Mode(step, opt)


def ours(bench: Bench, model: nn.Module, style: str) -> Mode:
    config = PrivacyConfig(
        noise_multiplier=SIGMA,
        clip_norm=CLIP,
        clipping_style=style,
        clipping_groups=4 if style == "group-wise" else None,
    )
    engine = ClippingEngine(model, config)
    engine.attach()
    opt = optimizer_for(model)
    device = bench.batch[0].device
    p = bench.batch[0].shape[0]
    mask = torch.ones(p, dtype=torch.bool, device=device)

    # The single-device strategy's release, as it runs: LocalReducer gathers the clipped sums into one flat fp32
    # buffer; the ledger (bound to a dataset of 100 p examples, sampled at q = 1/100: B = p, one physical batch per
    # logical step) adds the noise from its keyed streams once per coordinate, divides by B and accounts the step.
    ledger = PrivacyLedger(config)
    ledger.bind_data(DataLoader(TensorDataset(torch.zeros(100 * p)), batch_size=p), planned_steps=lambda _: None,
                     owner="step_time")  # fmt: skip
    reducer = LocalReducer(device, "step_time")
    named = list(engine.params.items())

    def step() -> None:
        with engine.recording(device, rows=p), _autocast(bench):
            loss = bench.per_example_losses(model, bench.batch).sum()
        engine.backward(loss, mask)
        for name, clipped_sum in engine.pop_summed().items():
            reducer.add(name, clipped_sum)
        reducer.release(ledger, named)
        opt.step()
        opt.zero_grad(set_to_none=True)

    k = len(engine.groups)
    return Mode(step, opt, engine.detach, f"{k} group{'s' if k > 1 else ''}" if style != "all-layer" else "")


def opacus(bench: Bench, model: nn.Module, grad_sample_mode: str) -> Mode:
    from opacus import PrivacyEngine

    handles = []
    if grad_sample_mode == "ghost":
        # Opacus's embedding norm sampler views the index tensor as [-1, 1]; expanded position ids cannot be viewed.
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                handles.append(module.register_forward_pre_hook(lambda m, args: (args[0].contiguous(), *args[1:])))
    opt = optimizer_for(model)
    loader = DataLoader(TensorDataset(*(t.cpu() for t in bench.batch)), batch_size=bench.batch[0].shape[0])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")  # expected: a benchmark needs no CSPRNG
        out = PrivacyEngine().make_private(
            module=model,
            optimizer=opt,
            data_loader=loader,
            criterion=nn.CrossEntropyLoss(),
            noise_multiplier=SIGMA,
            max_grad_norm=CLIP,
            grad_sample_mode=grad_sample_mode,
            poisson_sampling=False,
        )
    if grad_sample_mode == "ghost":
        gsm, dp_opt, criterion, _ = out

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            with _autocast(bench):
                loss = bench.ghost_loss(criterion, gsm, bench.batch)
            loss.backward()  # two backward passes inside
            dp_opt.step()

    else:
        gsm, dp_opt, _ = out

        def step() -> None:
            dp_opt.zero_grad(set_to_none=True)
            with _autocast(bench):
                loss = bench.per_example_losses(gsm, bench.batch).mean()
            loss.backward()
            dp_opt.step()

    def cleanup() -> None:
        dp_opt.zero_grad(set_to_none=True)
        gsm.cleanup()  # removes Opacus's hooks and the attributes it set on the parameters
        for handle in handles:
            handle.remove()

    return Mode(step, dp_opt, cleanup)


# ---------------------------------------------------------------------------------------------------- measuring
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_step_bytes(mode: Mode, device: torch.device) -> int:
    """Peak tensor memory allocated during one step above that allocated at its start (see the docstring)."""
    mode.optimizer.zero_grad(set_to_none=True)  # every mode starts its step without gradients
    gc.collect()
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        mode.step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - base
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        mode.step()
    # Raw allocator events (alloc > 0, free < 0) in time order. Blocks allocated before the step and freed in it
    # report no size; none matter here: gradients were freed above, the optimizer state is updated in place.
    events = sorted(
        (e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"), key=lambda e: e.start_ns()
    )
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


@dataclass
class Result:
    label: str
    variant: str = "same"  # "same": the model as built; "untied": the untied copy (models with tied weights)
    is_opacus: bool = False
    ms: float | None = None  # the median over rounds of each round's median step time
    rounds: list[float] = field(default_factory=list)  # each round's median step time, ms
    static_mb: float | None = None  # parameters, optimizer state and batch: allocated before a step begins
    working_mb: float | None = None  # the step's peak above that
    error: str | None = None

    @property
    def peak_mb(self) -> float | None:
        return None if self.working_mb is None or self.static_mb is None else self.static_mb + self.working_mb


def static_bytes(optimizer: torch.optim.Optimizer, batch: tuple[Tensor, ...]) -> int:
    """Bytes of the parameters, the optimizer's state (after a step) and the batch."""
    tensors = {id(p): p for group in optimizer.param_groups for p in group["params"]}
    for state in optimizer.state.values():
        tensors.update({id(t): t for t in state.values() if isinstance(t, Tensor)})
    tensors.update({id(t): t for t in batch})
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _error(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0] if lines else ''}"


def measure(
    plan: list[tuple[Result, Callable[[], Mode]]],
    batch: tuple[Tensor, ...],
    device: torch.device,
    args: argparse.Namespace,
    *,
    memory: bool = True,
) -> None:
    """One round: build every mode, burn each in, then time them interleaved; append each mode's median step time
    to its ``rounds`` (and, with ``memory``, measure its peak memory).

    Step r of every mode runs in turn, so that a slow spell of a shared machine lands on all modes alike instead of
    on whichever mode happened to run then. Peak memory is measured afterwards, one mode at a time. A mode that
    fails (a library refusing the model) keeps its error and drops out.
    """
    modes: dict[int, Mode] = {}
    for i, (result, build) in enumerate(plan):
        try:
            mode = build()
            if mode.note and f"({mode.note})" not in result.label:
                result.label += f" ({mode.note})"
            for _ in range(args.burn_in):
                mode.step()
            modes[i] = mode
        except Exception as exc:  # a refusal by a library is a result of the benchmark, not its end
            result.error = _error(exc)
            print(f"  {result.label:<44} {result.error}", file=sys.stderr, flush=True)
    _sync(device)
    times: dict[int, list[float]] = {i: [] for i in modes}
    gc.collect()
    gc.disable()  # as timeit does: no collector pause inside a timed step (reference counting still frees tensors)
    try:
        for _ in range(args.steps):
            for i, mode in modes.items():
                start = time.perf_counter()
                mode.step()
                _sync(device)
                times[i].append(time.perf_counter() - start)
    finally:
        gc.enable()
    for i, mode in modes.items():
        result = plan[i][0]
        result.rounds.append(1e3 * statistics.median(times[i]))
        result.ms = statistics.median(result.rounds)
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if memory:
            try:
                result.working_mb = peak_step_bytes(mode, device) / 2**20
                result.static_mb = static_bytes(mode.optimizer, batch) / 2**20
            except Exception as exc:
                result.error = _error(exc)
        lo, hi = 1e3 * min(times[i]), 1e3 * max(times[i])
        line = f"  {result.label:<44} {result.rounds[-1]:8.2f} ms (min {lo:.2f}, max {hi:.2f})"
        print(line, file=sys.stderr, flush=True)
    for mode in modes.values():
        mode.cleanup()
    modes.clear()
    gc.collect()


# ------------------------------------------------------------------------------------------------------ report
def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None else format(x, spec)


def _verdict(ratio: float | None, target: float) -> str:
    return "n/a" if ratio is None else ("met" if ratio <= target else "not met")


def _round_range(result: Result, reference: Result) -> str:
    """min-max over the rounds of the mode's step time / non-private's in the same round."""
    ratios = [a / b for a, b in zip(result.rounds, reference.rounds) if b]
    return f"{min(ratios):.2f}-{max(ratios):.2f}" if len(ratios) > 1 else ""


def print_table(results: list[Result], reference: Result, opacus_best: Result | None) -> None:
    header = ("mode", "step ms", "vs non-private", "range over rounds", "vs Opacus best", "peak MB", "working MB")
    rows = []
    for r in results:
        if r.error is not None:
            rows.append((r.label, f"n/a ({r.error})", "", "", "", "", ""))
        else:
            best_ms = opacus_best.ms if opacus_best else None
            ratios = (_ratio(r.ms, reference.ms), _ratio(r.ms, best_ms))
            memory = (_fmt(r.peak_mb, ".1f"), _fmt(r.working_mb, ".1f"))
            rows.append((r.label, _fmt(r.ms), _fmt(ratios[0]), _round_range(r, reference), _fmt(ratios[1]), *memory))
    ran = [header] + [row for row, r in zip(rows, results) if r.error is None]
    widths = [max(len(row[i]) for row in ran) for i in range(len(header))]  # a refusal's reason may run past
    widths[0] = max(len(row[0]) for row in [header, *rows])

    def line(cells: tuple[str, ...]) -> str:
        return (
            "| " + " | ".join([cells[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]) + " |"
        )

    print(line(header))
    print("|" + "|".join(["-" * (widths[0] + 2)] + ["-" * (w + 1) + ":" for w in widths[1:]]) + "|")
    for row in rows:
        print(line(row))


def benchmark(name: str, device: torch.device, args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    bench = MODELS[name](device)
    base = bench.model
    tied = tied_names(base)
    untied = untied_copy(base) if tied else None
    untied_note = f" (untied copy: own {', '.join(tied)})" if tied else ""

    # Every mode builds from a deep copy of the same initial weights.
    plan: list[tuple[Result, Callable[[], Mode]]] = [
        (Result("non-private"), lambda: non_private(bench, copy.deepcopy(base)))
    ]
    for style in STYLES:
        plan.append((Result(f"ours {style}"), lambda style=style: ours(bench, copy.deepcopy(base), style)))
    if tied:
        plan.append(
            (Result("ours all-layer" + untied_note, "untied"), lambda: ours(bench, copy.deepcopy(untied), "all-layer"))
        )
    for gsm in ("hooks", "ghost"):
        plan.append((Result(f"Opacus {gsm}", is_opacus=True), lambda gsm=gsm: opacus(bench, copy.deepcopy(base), gsm)))
    if tied:
        plan.append(
            (
                Result("Opacus ghost" + untied_note, "untied", is_opacus=True),
                lambda: opacus(bench, copy.deepcopy(untied), "ghost"),
            )
        )

    print(f"\n### {bench.title}\n", flush=True)
    print(
        f"running {len(plan)} modes, {args.rounds} round(s) of {args.burn_in} burn-in + {args.steps} timed steps "
        "each...",
        file=sys.stderr,
    )
    for r in range(args.rounds):
        measure(plan, bench.batch, device, args, memory=r == 0)
    results = [result for result, _ in plan]

    reference = results[0]
    opacus_ok = [r for r in results if r.is_opacus and r.ms is not None]
    opacus_best = min(opacus_ok, key=lambda r: r.ms) if opacus_ok else None
    print_table(results, reference, opacus_best)

    dp = results[1]  # ours all-layer, the default style
    parts = []
    time_ratio = _ratio(dp.ms, reference.ms)
    if name in TARGETS:
        target = TARGETS[name]
        parts.append(f"DP/non-DP time {_fmt(time_ratio)} (target <= {target}: {_verdict(time_ratio, target)})")
    else:
        parts.append(f"DP/non-DP time {_fmt(time_ratio)} (no target for this model)")
    mem_ratio = _ratio(dp.peak_mb, reference.peak_mb)
    working_ratio = _ratio(dp.working_mb, reference.working_mb)
    parts.append(
        f"DP/non-DP peak memory {_fmt(mem_ratio)} (target <= {MEMORY_TARGET}: {_verdict(mem_ratio, MEMORY_TARGET)}; "
        f"step working memory alone {_fmt(working_ratio)})"
    )
    if opacus_best is None:
        parts.append("ours/Opacus best: n/a (no Opacus mode ran)")
    else:
        # Like for like: ours all-layer on the same variant of the model as Opacus's fastest run.
        ours_same = next(
            r for r in results if r.label.startswith("ours all-layer") and r.variant == opacus_best.variant
        )
        opacus_ratio = _ratio(ours_same.ms, opacus_best.ms)
        variant = " (both on the untied copy)" if opacus_best.variant == "untied" else ""
        text = f"ours/Opacus best ({opacus_best.label.split(' (')[0]}{variant}) {_fmt(opacus_ratio)}"
        text += f" (target <= {OPACUS_TARGET}: {_verdict(opacus_ratio, OPACUS_TARGET)})"
        parts.append(text)
    print(f"\n**{name}** (DP = ours all-layer): " + "; ".join(parts) + ".", flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt,cnn,mlp", help="comma-separated subset of: " + ",".join(MODELS))
    parser.add_argument("--steps", type=int, default=25, help="timed steps per mode (median reported)")
    parser.add_argument("--burn-in", type=int, default=3, help="untimed steps per mode before timing")
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds (every mode rebuilt): the median over rounds, and their range"
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument(
        "--precision", default="32-true", choices=("32-true", "bf16-mixed"), help="autocast of every mode's forward"
    )
    parser.add_argument(
        "--allocator",
        default="retain",
        choices=("retain", "glibc"),
        help="CPU: 'retain' keeps freed memory in the process for every mode (lightning_dpzero.retain_freed_memory, "
        "as the main job does); 'glibc': the C library's defaults (fresh pages, faulted in, for large tensors)",
    )
    args = parser.parse_args()
    global PRECISION
    PRECISION = args.precision
    retained = args.allocator == "retain" and retain_freed_memory()
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    if args.steps < 1 or args.burn_in < 0:
        parser.error("--steps must be >= 1 and --burn-in >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    device = torch.device(args.device)

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    # Fires because the first layer's input (token ids, images) needs no gradient: expected, and said once per step.
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    import opacus

    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_name()})"
    print(
        f"device: {where}, {cores} cores, torch.get_num_threads()={torch.get_num_threads()}; "
        f"torch {torch.__version__}, opacus {opacus.__version__}, python {platform.python_version()}; "
        f"{args.rounds} round(s) of {args.burn_in} burn-in + {args.steps} timed steps per mode (median of the rounds' "
        f"medians); AdamW; sigma={SIGMA}, C={CLIP}; "
        f"precision {PRECISION}; allocator: {'freed memory retained' if retained else 'C library defaults'}"
    )
    for name in names:
        benchmark(name, device, args)


if __name__ == "__main__":
    main()
