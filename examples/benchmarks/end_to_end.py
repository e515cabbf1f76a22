"""End to end, as a user runs it: the main job (``python -m lightning_dpzero.train``) DP vs ``strategy=nonprivate``.

Command::

    python examples/benchmarks/end_to_end.py                   # 3 rounds of 150 steps, ~3-4 min on 2 cores
    python examples/benchmarks/end_to_end.py --steps 60 --rounds 2

Each round starts one process of the Hydra entry point per configuration (the default task: a GPT on the embedded
corpus, B = 128 expected examples per logical step, DP physical batches of p = 128: the presets take p = B), with
``StepTimes`` (below) added through ``trainer.callbacks``: the processes take turns, one logical step each, so that
every configuration meets the same machine (on a shared machine, separate runs do not: its speed drifts between
them) and no two steps run at once. A step is timed from the moment its process gets the turn to the end of the
step (fetching the batch, the physical batches' forward and backward, the noise, the optimizer step, the logging).
A run's figure is the mean over its steps after the first ``--warm-up`` (the self-check on step 0, the allocator's
first growth): a mean, not a median, since DP steps take one physical batch or two depending on the sample drawn.
Start-up, data generation and the noise calibration are outside it. Periodic validation, plots, loggers and the
progress bar are off in all runs. Configurations:

- ``non-private``: ``strategy=nonprivate`` (Lightning's ``SingleDeviceStrategy``, shuffled batches of 128).
- ``dp fixed``: ``strategy=dp``, every physical batch p rows (the last one of a step padded).
- ``dp few``: ``strategy=dp privacy.physical_batch_shapes=few`` (the default): the last physical batch takes p, p/2,
  p/4 or p/8 rows, whichever is the smallest that holds it.

The padding each mode processes is computed from the sampler itself (same N, q, p; ``--steps`` draws), as padded rows
over real rows. The table shows the median over rounds of the runs' figures, with their range, and the DP / non-private
ratio of each round's pair of runs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import Callback

CONFIGS = {
    "non-private": ["strategy=nonprivate"],
    "dp fixed": ["strategy=dp", "privacy.physical_batch_shapes=fixed"],
    "dp few": ["strategy=dp", "privacy.physical_batch_shapes=few"],
}
QUIET = ["trainer.val_check_interval=1000000", "trainer.logger=null", "plot=false", "rich_progress_bar=false",
         "+trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false"]  # fmt: skip
TARGET = 1.35
_STOPPED = "another job of the round stopped before its last step"


class StepTimes(Callback):
    """Times each logical step of the job, taking turns with the other jobs of a round.

    The jobs of a round form a ring of pipes: a job runs one logical step, passes the turn to the next job (a byte on
    ``send``) and waits for the turn to come back (a byte on ``receive``) before its next step, so that every
    configuration's steps are interleaved with the others' and meet the same machine, and no two steps run at once.
    ``first``: the job that takes the first turn (the others wait for it before their first step). A step's time runs
    from the moment the job gets its turn to the end of the step (``on_train_batch_end``): fetching the batch, the
    physical batches' forward and backward, the noise, the optimizer step, the logging. Written to ``path`` (a JSON
    list of seconds) when training ends.
    """

    def __init__(self, path: str, steps: int, receive: int, send: int, first: bool = False) -> None:
        self.path, self.steps, self.receive, self.send, self.first = Path(path), steps, receive, send, first
        self.times: list[float] = []
        self._go = 0.0

    def _wait(self) -> None:
        if not os.read(self.receive, 1):
            raise RuntimeError(f"end_to_end.StepTimes: {_STOPPED}")

    def on_train_start(self, *args: object) -> None:
        if not self.first:
            self._wait()
        self._go = time.perf_counter()

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        self.times.append(time.perf_counter() - self._go)
        os.write(self.send, b".")
        self._wait()
        if len(self.times) == self.steps:
            # Every job has run its last step: one more lap lets them go, so that none validates or exits while
            # another's last step is timed.
            os.write(self.send, b".")
            if self.first:
                self._wait()
        self._go = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.is_global_zero:
            self.path.write_text(json.dumps(self.times))


def _round(steps: int, warm_up: int, root: Path) -> dict[str, float]:
    """One round: the configurations' jobs started together, taking turns step by step (StepTimes); seconds per
    logical step of each, the mean over its steps after ``warm_up``."""
    here = str(Path(__file__).resolve().parent)  # StepTimes is imported from this file in the jobs' processes
    env = {**os.environ, "PYTHONWARNINGS": "ignore",
           "PYTHONPATH": os.pathsep.join([here, *filter(None, [os.environ.get("PYTHONPATH")])])}  # fmt: skip
    pipes = [os.pipe() for _ in CONFIGS]  # pipes[i]: job i -> job i + 1 (mod k)
    jobs = []
    try:
        for i, (name, overrides) in enumerate(CONFIGS.items()):
            out = Path(tempfile.mkdtemp(dir=root))
            receive, send = pipes[i - 1][0], pipes[i][1]
            timer = {"_target_": "end_to_end.StepTimes", "path": out / "step_times.json", "steps": steps,
                     "receive": receive, "send": send, "first": i == 0}  # fmt: skip
            added = [f"+trainer.callbacks.step_times.{k}={v}" for k, v in timer.items()]
            cmd = [sys.executable, "-m", "lightning_dpzero.train", *overrides, *QUIET, f"trainer.max_steps={steps}",
                   f"hydra.run.dir={out}", *added]  # fmt: skip
            log = (out / "job.log").open("w")
            jobs.append((name, out, cmd, subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                                          pass_fds=(receive, send))))  # fmt: skip
            log.close()
    finally:
        for r, w in pipes:  # only the jobs hold the pipes now: a job that dies closes its end and the ring stops
            os.close(r)
            os.close(w)
    failed = [(out, cmd, (out / "job.log").read_text()) for _, out, cmd, proc in jobs if proc.wait() != 0]
    if failed:  # the job that failed first: the others stop when it does, each saying so (StepTimes._wait)
        out, cmd, log = min(failed, key=lambda job: _STOPPED in job[2])
        raise SystemExit(f"{' '.join(cmd)} failed:\n{log[-3000:]}")
    return {name: statistics.fmean(json.loads((out / "step_times.json").read_text())[warm_up:])
            for name, out, _, _ in jobs}  # fmt: skip


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
    parser.add_argument("--steps", type=int, default=150, help="logical steps per run")
    parser.add_argument("--warm-up", type=int, default=10, help="first steps of each run left out of its mean")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.steps <= args.warm_up:
        parser.error("--steps must exceed --warm-up")
    root = Path(tempfile.mkdtemp(prefix="end_to_end_"))
    per_step: dict[str, list[float]] = {name: [] for name in CONFIGS}
    for round_index in range(args.rounds):
        for name, seconds in _round(args.steps, args.warm_up, root).items():
            per_step[name].append(1000 * seconds)
            print(f"# round {round_index + 1}/{args.rounds} {name:<12} {1000 * seconds:.1f} ms per logical step (mean "
                  f"of steps {args.warm_up + 1}-{args.steps})", file=sys.stderr, flush=True)  # fmt: skip
    base = statistics.median(per_step["non-private"])
    print(f"\nmain job (GPT T=64, D=64, 2 layers; B=128, p=128), runs of {args.steps} logical steps taking turns step "
          f"by step, median of {args.rounds} rounds (range)\n")  # fmt: skip
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
