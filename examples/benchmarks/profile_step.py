"""Where the time of one DP step goes, next to the non-private step: phases, then operators.

Command::

    python examples/benchmarks/profile_step.py                    # gpt and cnn of step_time.py, 1 thread, ~1 min
    python examples/benchmarks/profile_step.py --models cnn --threads 2 --top 15

For each model of ``step_time.py`` (same model, same physical batch, B = p) two modes run on deep copies:
``non-private`` (``mean(losses).backward()``) and ``ours`` (the engine with the default all-layer clipping: a
``recording`` forward, ``engine.backward``, ``pop_summed``). Printed per model:

- phases: the median over ``--steps`` steps (after 3 untimed) of the wall time of the forward, the backward (for
  ours: the engine's backward, which computes the output gradients, the per-example norms, the clip factors and
  the clipped sums) and the hand-over of the clipped sums; the optimizer step and the noise are the same in both
  modes (the noise is one Gaussian draw per parameter coordinate) and are left out;
- operators: torch.profiler's self CPU time per step of the ``--top`` most expensive operators of each mode, and
  "outside operators": the wall time not spent in any operator (Python: hooks, the engine's bookkeeping, autograd's
  own dispatch).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

import step_time  # noqa: E402

from lightning_dpzero.clipping import ClippingEngine  # noqa: E402
from lightning_dpzero.config import PrivacyConfig  # noqa: E402


def _phases(bench: step_time.Bench, steps: int) -> dict[str, dict[str, float]]:
    plain, private = copy.deepcopy(bench.model), copy.deepcopy(bench.model)
    engine = ClippingEngine(private, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0))
    engine.attach()
    p = bench.batch[0].shape[0]
    mask = torch.ones(p, dtype=torch.bool, device=bench.batch[0].device)
    times: dict[str, dict[str, list[float]]] = {
        "non-private": {"forward": [], "backward": [], "hand-over": []},
        "ours": {"forward": [], "backward": [], "hand-over": []},
    }

    def non_private() -> None:
        t0 = time.perf_counter()
        loss = bench.per_example_losses(plain, bench.batch).mean()
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        for param in plain.parameters():
            param.grad = None
        t3 = time.perf_counter()
        for key, value in zip(("forward", "backward", "hand-over"), (t1 - t0, t2 - t1, t3 - t2)):
            times["non-private"][key].append(value)

    def ours() -> None:
        t0 = time.perf_counter()
        with engine.recording(mask.device, rows=p):
            loss = bench.per_example_losses(private, bench.batch).sum()
        t1 = time.perf_counter()
        engine.backward(loss, mask)
        t2 = time.perf_counter()
        engine.pop_summed()
        t3 = time.perf_counter()
        for key, value in zip(("forward", "backward", "hand-over"), (t1 - t0, t2 - t1, t3 - t2)):
            times["ours"][key].append(value)

    for _ in range(steps + 3):
        for step in (non_private, ours):
            step()
    out = {mode: {k: 1000 * statistics.median(v[3:]) for k, v in phases.items()} for mode, phases in times.items()}
    out["_steps"] = {"non-private": non_private, "ours": ours}  # type: ignore[dict-item]
    return out


def _operators(step, steps: int) -> tuple[list[tuple[str, float, int]], float, float]:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        wall = (time.perf_counter() - start) * 1000 / steps
    rows = [(e.key, e.self_cpu_time_total / 1000 / steps, e.count // steps) for e in prof.key_averages()]
    rows.sort(key=lambda r: -r[1])
    in_ops = sum(r[1] for r in rows if r[0].startswith("aten::") or r[0].startswith("_Tap"))
    return rows, wall, in_ops


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="gpt,cnn")
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    makers = {"gpt": step_time.make_gpt, "cnn": step_time.make_cnn, "mlp": step_time.make_mlp}
    for name in args.models.split(","):
        bench = makers[name](torch.device("cpu"))
        phases = _phases(bench, args.steps)
        steps = phases.pop("_steps")
        print(f"\n### {bench.title}, {args.threads} thread(s)\n")
        print("| phase | non-private ms | ours ms | ours - non-private ms |")
        print("|---|---|---|---|")
        for key in ("forward", "backward", "hand-over"):
            a, b = phases["non-private"][key], phases["ours"][key]
            print(f"| {key} | {a:.1f} | {b:.1f} | {b - a:+.1f} |")
        total = [sum(phases[m].values()) for m in ("non-private", "ours")]
        print(f"| total | {total[0]:.1f} | {total[1]:.1f} | {total[1] - total[0]:+.1f} (x{total[1] / total[0]:.2f}) |")
        for mode in ("non-private", "ours"):
            rows, wall, in_ops = _operators(steps[mode], max(3, args.steps // 3))  # type: ignore[index]
            print(f"\n{mode}: operators, self CPU ms per step (profiled wall {wall:.1f} ms, outside operators "
                  f"{wall - in_ops:.1f} ms)\n")  # fmt: skip
            print("| operator | ms | calls |")
            print("|---|---|---|")
            for key, ms, calls in rows[: args.top]:
                print(f"| `{key[:60]}` | {ms:.2f} | {calls} |")


if __name__ == "__main__":
    main()
