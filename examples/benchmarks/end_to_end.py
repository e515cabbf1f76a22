"""End to end, as a user runs it: the main job (``python -m lightning_dpzero.train``) DP vs ``strategy=nonprivate``.

Command::

    python examples/benchmarks/end_to_end.py                   # 3 interleaved rounds of 100 steps, ~8 min on 2 cores
    python examples/benchmarks/end_to_end.py --steps 50 --rounds 2

Each configuration runs as a subprocess of the Hydra entry point (the default task: a GPT on the embedded corpus,
B = 128 expected examples per logical step, DP physical batches of p = 128: the presets take p = B), once with
``--steps`` logical steps and once with 1; the time per logical step is the difference divided by ``steps - 1``
(start-up, data generation and the calibration cancel out; the self-check on step 0 too). Periodic validation,
plots, loggers and the progress bar are off in all runs (one validation at the end, in both lengths). Configurations:

- ``non-private``: ``strategy=nonprivate`` (Lightning's ``SingleDeviceStrategy``, shuffled batches of 128).
- ``dp fixed``: ``strategy=dp``, every physical batch p rows (the last one of a step padded).
- ``dp few``: ``strategy=dp privacy.physical_batch_shapes=few`` (the default): the last physical batch takes p, p/2,
  p/4 or p/8 rows, whichever is the smallest that holds it.

The padding each mode processes is computed from the sampler itself (same N, q, p; ``--steps`` draws), as padded rows
over real rows. The rounds interleave the configurations; the table shows per-step medians over rounds with the range.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CONFIGS = {
    "non-private": ["strategy=nonprivate"],
    "dp fixed": ["strategy=dp", "privacy.physical_batch_shapes=fixed"],
    "dp few": ["strategy=dp", "privacy.physical_batch_shapes=few"],
}
QUIET = ["trainer.val_check_interval=1000000", "trainer.logger=null", "plot=false", "rich_progress_bar=false",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]  # fmt: skip
TARGET = 1.35


def _run(overrides: list[str], steps: int, root: Path) -> float:
    out = Path(tempfile.mkdtemp(dir=root))
    cmd = [sys.executable, "-m", "lightning_dpzero.train", *overrides, *QUIET, f"trainer.max_steps={steps}",
           f"hydra.run.dir={out}"]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall


def _padding(steps: int, shapes: str) -> float:
    from lightning_dpzero.randomness import SecretKey
    from lightning_dpzero.sampling.poisson import PoissonBatchSampler

    sampler = PoissonBatchSampler(num_examples=4096, sample_rate=128 / 4096, physical_batch_size=128, shapes=shapes,
                                  steps_per_epoch=steps, key=SecretKey.from_seed(0))  # fmt: skip
    real = padded = 0
    for keys in sampler:
        flags = [flag for _, flag in keys[1:]]
        real, padded = real + sum(flags), padded + len(flags) - sum(flags)
    return padded / real


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--steps", type=int, default=100, help="logical steps of the long runs")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="end_to_end_"))
    per_step: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        for name, overrides in CONFIGS.items():
            long, short = _run(overrides, args.steps, root), _run(overrides, 1, root)
            ms = 1000 * (long - short) / (args.steps - 1)
            per_step[name].append(ms)
            print(
                f"# round {round_index + 1}/{args.rounds} {name:<12} {ms:.1f} ms per logical step "
                f"({long:.1f} s for {args.steps} steps, {short:.1f} s for 1)",
                file=sys.stderr,
                flush=True,
            )
    base = statistics.median(per_step["non-private"])
    print(f"\nmain job (GPT T=64, D=64, 2 layers; B=128, p=128), {args.steps} logical steps, median of {args.rounds} "
          "interleaved rounds (range)\n")  # fmt: skip
    print(f"| configuration | ms per logical step | / non-private (target <= {TARGET}) | padded rows / real rows |")
    print("|---|---|---|---|")
    for name, values in per_step.items():
        med = statistics.median(values)
        ratios = [v / b for v, b in zip(values, per_step["non-private"])]
        shapes = name.split()[-1] if name.startswith("dp") else None
        pad = f"{_padding(args.steps, shapes):.3f}" if shapes else "0"
        ratio = (
            "1"
            if name == "non-private"
            else (
                f"{med / base:.2f} ({min(ratios):.2f}-{max(ratios):.2f}) {'met' if med / base <= TARGET else 'not met'}"
            )
        )
        print(f"| {name} | {med:.1f} ({min(values):.1f}-{max(values):.1f}) | {ratio} | {pad} |")


if __name__ == "__main__":
    main()
