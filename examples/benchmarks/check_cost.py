"""What the checks that keep a run private cost per step: the engine with them vs the same engine without them.

Commands::

    python examples/benchmarks/check_cost.py                         # gpt, cnn; 3 rounds of 30 interleaved steps
    python examples/benchmarks/check_cost.py --models gpt --steps 60 --rounds 5

The checks that run on every physical batch, and what this script removes to measure them (for measurement only:
the library has no switch that turns them off):

- fp32 range: before a Gram-matrix ("ghost") norm, one pass over each factor (``aminmax``) decides whether the
  Gram sums can be formed in plain fp32 or need rows rescaled by powers of two; removed: always plain fp32.
- cancellation: every ghost norm also sums the absolute values of its terms (its *mass*), and blocks whose
  mass exceeds 64 times their squared norm, or whose norm is not finite, are recomputed exactly in float64;
  removed: the mass is the value itself and no block is tested.
- non-finite examples: a test per group of the clipped norms (an example with an inf/NaN gradient is dropped);
  kept in both modes (a few operations on [n] values).

The per-example self-check (``selfcheck.py``) runs on the first logical step and then every ``self_check_every``
(100) logical steps; it is timed here on its own (its 8-row probes, two forwards and backwards each with autograd's
reference on the first, and the comparison of every tap's rows) and shown divided by 100 steps. The watch that
follows data-free values (``watch.py``) runs on the first physical batch only for these models (none of them computes
a shared output); it is part of the first step, not of the steady state timed here.

Timing: both engines are built on deep copies of one model; one step of each in turn, the order alternating (garbage
collector off), the median of each round; the table gives the median over rounds of the ratio with its range.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from unittest import mock

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402  (the benchmark models)

from lightning_dpzero.clipping import ClippingEngine, contributions  # noqa: E402
from lightning_dpzero.clipping import engine as engine_module  # noqa: E402
from lightning_dpzero.config import PrivacyConfig  # noqa: E402
from lightning_dpzero.selfcheck import SelfCheck  # noqa: E402

TARGET = 0.03  # the checks add at most 3% per step
_TRUE = torch.ones((), dtype=torch.bool)


@contextlib.contextmanager
def _without_checks() -> Iterator[None]:
    def gram_terms(left: torch.Tensor, right: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        value = left.mul_(right).sum((1, 2)).double()
        return value, value

    with (
        mock.patch.object(contributions, "_in_safe_range", lambda *factors: True),
        mock.patch.object(contributions, "_gram_terms", gram_terms),
        mock.patch.object(engine_module, "_safe", lambda norm2, mass: _TRUE.expand_as(norm2)),  # no block tested
    ):
        yield


def _step(bench: step_time.Bench, model: torch.nn.Module, engine: ClippingEngine) -> Callable[[], None]:
    p = bench.batch[0].shape[0]
    mask = torch.ones(p, dtype=torch.bool)

    def run() -> None:
        with engine.recording(mask.device, rows=p):
            loss = bench.per_example_losses(model, bench.batch).sum()
        engine.backward(loss, mask)
        engine.pop_summed()

    return run


def _self_check_seconds(bench: step_time.Bench) -> float:
    model = copy.deepcopy(bench.model)
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0))
    engine.attach()
    rows = SelfCheck.ROWS
    x, y = (t[:rows] for t in bench.batch)
    spare = (bench.batch[0][rows : rows + 1], bench.batch[1][rows : rows + 1])

    def batches(row: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        if row is None:
            return x, y
        xr, yr = x.clone(), y.clone()
        xr[row], yr[row] = spare[0][0], spare[1][0]
        return xr, yr

    check = SelfCheck(every=100)
    seconds = []
    for step in range(4):  # the first call pays for the watch of the first batch
        failure = check.run(
            module=model, engine=engine, batches=batches, forward=lambda b: bench.per_example_losses(model, b),
            context=contextlib.nullcontext, device=torch.device("cpu"), loss_of=lambda out: out,
            parameter_reference=True, rows=rows, step=step,
        )  # fmt: skip
        if failure:
            raise SystemExit(f"self-check failed on {bench.name}: {failure}")
        seconds.append(check.seconds[-1])
    return statistics.median(seconds[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="gpt,cnn")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--burn-in", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps\n")
    print("| model | step ms, checks | step ms, no checks | per-step checks | self-check ms (every 100 steps) "
          f"| total per step (target <= {TARGET:.0%}) |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        bench = getattr(step_time, f"make_{name}")(torch.device("cpu"))
        with_ms, without_ms, ratios = [], [], []
        for _ in range(args.rounds):
            runs = {}
            for mode in ("checks", "none"):
                model = copy.deepcopy(bench.model)
                engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0))
                engine.attach()
                runs[mode] = _step(bench, model, engine)
            times: dict[str, list[float]] = {mode: [] for mode in runs}
            gc.disable()
            try:
                for i in range(args.burn_in + args.steps):
                    order = list(runs.items()) if i % 2 == 0 else list(runs.items())[::-1]  # no order bias
                    for mode, run in order:
                        with _without_checks() if mode == "none" else contextlib.nullcontext():
                            start = time.perf_counter()
                            run()
                            elapsed = time.perf_counter() - start
                        if i >= args.burn_in:
                            times[mode].append(elapsed)
            finally:
                gc.enable()
            a, b = statistics.median(times["checks"]), statistics.median(times["none"])
            with_ms.append(1000 * a)
            without_ms.append(1000 * b)
            ratios.append(a / b - 1)
        per_step = statistics.median(ratios)
        check_ms = 1000 * _self_check_seconds(bench)
        base = statistics.median(without_ms)
        total = per_step + check_ms / 100 / base
        print(
            f"| {name} | {statistics.median(with_ms):.2f} | {base:.2f} | {per_step:+.1%} ({min(ratios):+.1%} to "
            f"{max(ratios):+.1%}) | {check_ms:.1f} ({check_ms / 100 / base:+.1%} per step) | {total:+.1%} "
            f"{'met' if total <= TARGET else 'not met'} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
