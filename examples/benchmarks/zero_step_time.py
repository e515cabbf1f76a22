"""Step time and peak RSS of the DP strategies vs their non-private Lightning counterparts, 2 CPU processes (gloo).

Command::

    python examples/benchmarks/zero_step_time.py                         # all 5 pairs, ~6-8 min on 2 cores
    python examples/benchmarks/zero_step_time.py --pairs zero3,ddp --steps 20 --burn-in 5
    python examples/benchmarks/zero_step_time.py --physical 24           # DP physical batch size per rank
    python examples/benchmarks/zero_step_time.py --pairs zero3,zero3_offload,zero3_offload_params,fsdp,fsdp_offload \
        --accumulate --batch 512 --physical 32 --T 128 --steps 6 --burn-in 2     # memory features (docs' table)
    python examples/benchmarks/zero_step_time.py --accumulate --batch 512 --physical 32 --T 128 --steps 8 --burn-in 2 \
        --rounds 2                                                       # the README's table (~13 min)

The launcher runs every configuration as ``torchrun --standalone --nproc_per_node 2`` of this file with
``--worker`` (one fresh pair of processes per configuration, ``OMP_NUM_THREADS=1``, one torch thread per rank) and
prints a markdown table. Pairs (same GPT, same AdamW, fp32, same expected examples per logical step):

- ``ddp``: ``DPDDPStrategy`` vs Lightning's ``DDPStrategy``.
- ``fsdp``: ``DPFSDPStrategy`` vs Lightning's ``ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)``;
  both on a LightningModule whose ``configure_model`` calls ``fully_shard`` per transformer block and on the root
  GPT module
  (``--fsdp-dp-sharding own`` lets the DP strategy shard the plain module itself instead: every parameter-owning
  module, then the root).
- ``zero2_offload``, ``zero3_offload``, ``zero3_offload_params``: the same with ``offload_optimizer=True`` (and
  ``offload_parameters=True``) on both sides, the same torch AdamW stepped on the CPU by DeepSpeed in both
  (``zero_force_ds_cpu_optimizer=False``); ``fsdp_offload``: FSDP2's ``CPUOffloadPolicy`` on both sides, each
  strategy sharding the plain module itself. On a CPU-only machine the "device" is host memory too, so offload
  saves nothing there: these rows show what offload costs under DP next to what it costs without.
- ``zero1/2/3``: ``DPZeroStrategy(stage=s)`` vs Lightning's ``DeepSpeedStrategy(stage=s)``, the latter through a
  subclass of the library's ``DeepSpeedCPUStrategy`` (the CPU bypasses ``DPZeroStrategy`` builds on);
  ``gradient_clipping=0`` in both (DeepSpeed >= 0.19 otherwise
  defaults to 1.0 in the baseline only). DeepSpeed's shared-memory comm-op build is skipped, as in the tests
  (``deepspeed.comm.torch.build_shm_op = lambda: None``): gloo does the collectives.

Per logical step: the DP run draws a Poisson sample of expected size B (``--batch``, split over the 2 ranks, cut
into physical batches of ``--physical`` rows per rank, padded to the same number of physical batches on every rank);
the non-private run reads ``B / 2`` examples per rank, at once or, with ``--accumulate``, in micro-batches of
``--physical`` rows accumulated by Lightning (``accumulate_grad_batches``) to one optimizer step: what a non-private
user runs when ``B / 2`` rows do not fit at once, and the regime of DP training (large logical batches), where the
padding of the last physical batch is a small fraction of the step. The table shows the realised examples per step
(the sum over ranks of real rows; DP's mean is about B) and, for DP, the rows actually run through the model
(padding included).

Measures: ``ms`` is the median, over the ``--steps`` timed steps after ``--burn-in`` untimed ones, of the wall time
from ``on_train_batch_start`` of a step's first (micro-)batch to ``on_train_batch_end`` of its last (forward,
backward, reductions, noise and optimizer step; the per-step time is the max over the two ranks). ``peak RSS`` is
the max over ranks of the process RSS, sampled by psutil every 5 ms from process start (it includes the imported
libraries, so with this small model it is mostly framework overhead); "above the start of fit" is the peak during
``trainer.fit`` minus the RSS just before it (what training adds: sharded states, gradients, activations, buffers).
The project's targets: dp_zero3 / deepspeed_stage_3 step time <= 1.25; DP / non-DP peak memory <= 1.2; the general
DP / non-DP step-time target (<= 1.2) is for a GPT with T >= 128, so for the other rows at this T it is shown in
parentheses, for information.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PAIRS = ("zero1", "zero2", "zero3", "fsdp", "ddp")
OFFLOAD_PAIRS = ("zero2_offload", "zero3_offload", "zero3_offload_params", "fsdp_offload")
LABELS = {
    "zero1": ("deepspeed_stage_1", "dp_zero1"),
    "zero2": ("deepspeed_stage_2", "dp_zero2"),
    "zero3": ("deepspeed_stage_3", "dp_zero3"),
    "fsdp": ("ModelParallel (FSDP2)", "dp_fsdp"),
    "ddp": ("ddp", "dp_ddp"),
    "zero2_offload": ("deepspeed_stage_2 + optimizer offload", "dp_zero2 + optimizer offload"),
    "zero3_offload": ("deepspeed_stage_3 + optimizer offload", "dp_zero3 + optimizer offload"),
    "zero3_offload_params": (
        "deepspeed_stage_3 + optimizer, parameter offload",
        "dp_zero3 + optimizer, parameter offload",
    ),
    "fsdp_offload": ("FSDP2 + CPUOffloadPolicy", "dp_fsdp + CPUOffloadPolicy"),
}
TIME_TARGETS = {"zero3": "<= 1.25"}
DEFAULT_TIME_TARGET = "<= 1.2"  # the project target: a GPT with T >= 128; shown in parentheses below that
MEMORY_TARGET = 1.2


# ================================================================================================ worker side
class _PeakRSS:
    """Samples this process's RSS on a daemon thread; ``peak`` in bytes."""

    def __init__(self, interval: float = 0.005) -> None:
        import psutil

        self._proc, self._interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self._interval)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)
        return self.peak


def _worker(args: argparse.Namespace) -> None:
    rss = _PeakRSS()
    import torch

    torch.set_num_threads(1)
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from torch.utils.data import DataLoader, Dataset

    import lightning_dpzero as dpz
    from lightning_dpzero.sampling.poisson import LogicalBatch
    from lightning_dpzero.tasks.gpt import GPTTask

    pair, private = args.pair, bool(args.private)
    if pair.startswith("zero"):
        import deepspeed.comm.torch  # noqa: F401

        sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None  # as the tests: no ~35 s shm op build

    L.seed_everything(0)
    world = 2

    class Tokens(Dataset):
        def __init__(self, n: int, t: int, vocab: int) -> None:
            gen = torch.Generator().manual_seed(1)
            self.ids = torch.randint(0, vocab, (n, t + 1), generator=gen)

        def __len__(self) -> int:
            return len(self.ids)

        def __getitem__(self, i: int):
            row = self.ids[i]
            return row[:-1], row[1:]

    hp = dict(vocab_size=args.vocab, block_size=args.T, n_layer=args.layers, n_head=4, n_embd=args.D, lr=1e-3)

    class Task(GPTTask):
        def train_dataloader(self) -> DataLoader:
            per_rank = args.physical if args.accumulate else args.batch // world
            return DataLoader(Tokens(args.N, args.T, args.vocab), batch_size=per_rank, shuffle=True)

    class ShardedTask(Task):
        def configure_model(self) -> None:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            # the root is the GPT, not the LightningModule: Lightning calls training_step, not forward, so hooks
            # on the LightningModule's forward would never unshard the embeddings and the final LayerNorm
            fully_shard(self.model, mesh=mesh)

    # non-private with --accumulate: one optimizer step every `accumulate` micro-batches (DP: every batch is a step)
    accumulate = 1 if private or not args.accumulate else args.batch // (world * args.physical)

    class Timer(Callback):
        """Wall time of each optimizer step: from its first (micro-)batch's start to its last one's end."""

        def __init__(self) -> None:
            self.times: list[float] = []
            self.real: list[int] = []
            self.rows: list[int] = []
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if isinstance(batch, LogicalBatch):
                real, rows = int(sum(int(m.sum()) for m in batch.masks)), int(sum(len(m) for m in batch.masks))
            else:
                real = rows = len(batch[0])
            if batch_idx % accumulate == 0:
                self.real.append(0)
                self.rows.append(0)
                self._t0 = time.perf_counter()
            self.real[-1] += real
            self.rows[-1] += rows

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if (batch_idx + 1) % accumulate == 0:
                self.times.append(time.perf_counter() - self._t0)

    privacy = dpz.PrivacyConfig(
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_batch_size=args.batch,
        physical_batch_size=args.physical,
        seed=7,
        clipping_style=args.style,
        clipping_groups=args.groups if args.style == "group-wise" else None,
    )
    module_cls = Task
    if pair == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        strategy = (
            dpz.DPDDPStrategy(privacy, process_group_backend="gloo")
            if private
            else DDPStrategy(process_group_backend="gloo")
        )
    elif pair == "fsdp_offload":  # both shard every parameter-owning module, then the root, with the policy
        from lightning_dpzero.strategies.fsdp import FSDP2Strategy

        if private:
            strategy = dpz.DPFSDPStrategy(
                privacy, stream_clipped_sums=not args.buffered, cpu_offload=True, process_group_backend="gloo"
            )
        else:
            strategy = FSDP2Strategy(cpu_offload=True, process_group_backend="gloo")
    elif pair == "fsdp":
        from lightning.pytorch.strategies import ModelParallelStrategy

        if private:
            strategy = dpz.DPFSDPStrategy(
                privacy, stream_clipped_sums=not args.buffered, data_parallel_size=2, process_group_backend="gloo"
            )
            module_cls = ShardedTask if args.fsdp_dp_sharding == "block" else Task
        else:
            strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1, process_group_backend="gloo")
            module_cls = ShardedTask
    else:
        stage = int(pair[4])  # Lightning's default DeepSpeed config for the stage, in both runs
        offload = {"offload_optimizer": "_offload" in pair, "offload_parameters": pair.endswith("_params")}
        if private:
            stream = False if args.buffered else None  # None: the default (streaming at stage 3)
            strategy = dpz.DPZeroStrategy(
                stage=stage, privacy=privacy, stream_clipped_sums=stream, process_group_backend="gloo", **offload
            )
        else:
            strategy = _cpu_deepspeed_strategy()(stage=stage, process_group_backend="gloo", **offload)

    timer = Timer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategy,
        precision="32-true",
        max_steps=args.burn_in + args.steps,
        accumulate_grad_batches=accumulate,
        callbacks=[timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    model = module_cls(**hp)
    n_params = sum(p.numel() for p in model.parameters())
    start = rss._proc.memory_info().rss  # imports and the unsharded model: what training adds is above it
    trainer.fit(model)
    peak = rss.stop()
    out = {
        "rank": trainer.global_rank,
        "times": timer.times[args.burn_in :],
        "real": timer.real[args.burn_in :],
        "rows": timer.rows[args.burn_in :],
        "peak_rss": peak,
        "train_rss": peak - start,
        "params": n_params,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / f"rank{trainer.global_rank}.json").write_text(json.dumps(out))


def _cpu_deepspeed_strategy():
    """Lightning's DeepSpeedStrategy on the same CPU path as ``DPZeroStrategy``, without DP."""
    from lightning_dpzero.strategies.deepspeed_cpu import DeepSpeedCPUStrategy

    class NonPrivateZero(DeepSpeedCPUStrategy):
        def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
            self.config["gradient_clipping"] = 0.0  # as DPZeroStrategy (DeepSpeed >= 0.19 defaults it to 1.0)
            # ZeRO-Offload with the same torch AdamW as the DP run (DeepSpeed otherwise insists on its CPU Adam)
            self.config["zero_force_ds_cpu_optimizer"] = False
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)

    return NonPrivateZero


# ============================================================================================== launcher side
def _run_one(args: argparse.Namespace, pair: str, private: bool, root: Path, round_index: int) -> dict:
    out = root / f"{pair}_{'dp' if private else 'np'}_{round_index}"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(Path(__file__).resolve()), "--worker", "--pair", pair, "--private", str(int(private)), "--out", str(out),
        "--batch", str(args.batch), "--physical", str(args.physical), "--steps", str(args.steps),
        "--burn-in", str(args.burn_in), "--T", str(args.T), "--D", str(args.D), "--layers", str(args.layers),
        "--vocab", str(args.vocab), "--N", str(args.N), "--fsdp-dp-sharding", args.fsdp_dp_sharding,
        "--style", args.style, "--groups", str(args.groups), *(["--buffered"] if args.buffered else []),
        *(["--accumulate"] if args.accumulate else []),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "PYTHONWARNINGS": "ignore"}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {args.timeout} s"}
    wall = time.perf_counter() - t0
    log = root / f"{out.name}.log"
    log.write_text(proc.stdout + "\n----- stderr -----\n" + proc.stderr)
    files = sorted(out.glob("rank*.json")) if out.exists() else []
    if proc.returncode != 0 or len(files) != 2:
        return {"error": _reason(proc.stderr + proc.stdout, proc.returncode), "log": str(log)}
    ranks = [json.loads(f.read_text()) for f in files]
    return {
        "per_step": [max(ts) for ts in zip(*(r["times"] for r in ranks))],
        "real": [sum(xs) for xs in zip(*(r["real"] for r in ranks))],
        "rows": [sum(xs) for xs in zip(*(r["rows"] for r in ranks))],
        "rss_mb": max(r["peak_rss"] for r in ranks) / 2**20,
        "train_mb": max(r["train_rss"] for r in ranks) / 2**20,
        "params": ranks[0]["params"],
        "wall_s": wall,
        "log": str(log),
    }


def _pooled(runs: list[dict]) -> dict:
    """The rounds of one configuration as one sample: every timed step of every round."""
    failed = [r for r in runs if "error" in r]
    if failed:
        return failed[0]
    per_step = [t for r in runs for t in r["per_step"]]
    return {
        "ms": 1000 * statistics.median(per_step),
        "min_ms": 1000 * min(per_step),
        "max_ms": 1000 * max(per_step),
        "round_ms": [1000 * statistics.median(r["per_step"]) for r in runs],
        "real": statistics.mean(x for r in runs for x in r["real"]),
        "rows": statistics.mean(x for r in runs for x in r["rows"]),
        "rss_mb": max(r["rss_mb"] for r in runs),
        "train_mb": max(r["train_mb"] for r in runs),
        "params": runs[0]["params"],
        "wall_s": sum(r["wall_s"] for r in runs),
    }


def _reason(text: str, rc: int) -> str:
    """The most telling line of a failed run: the last exception line of the first failing rank."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        stripped = ln.split("]:", 1)[-1].strip() if ln.startswith("[rank") else ln
        head = stripped.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return stripped[:300]
    return f"exit code {rc}: " + (lines[-1][:300] if lines else "no output")


def _time_target(pair: str, seq_len: int) -> str:
    if pair in TIME_TARGETS:
        return TIME_TARGETS[pair]
    return DEFAULT_TIME_TARGET if seq_len >= 128 else f"({DEFAULT_TIME_TARGET})"


def _fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _launch(args: argparse.Namespace) -> None:
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    bad = [p for p in pairs if p not in LABELS]
    if bad:
        raise SystemExit(f"unknown pairs {bad}; choose from {','.join(LABELS)}")
    root = Path(args.logs or tempfile.mkdtemp(prefix="zero_step_time_"))
    root.mkdir(parents=True, exist_ok=True)
    runs: dict[tuple[str, bool], list[dict]] = {(pair, private): [] for pair in pairs for private in (False, True)}
    t_start = time.perf_counter()
    for round_index in range(args.rounds):  # rounds interleave the configurations: slow phases hit all of them
        for pair in pairs:
            for private in (False, True):
                res = _run_one(args, pair, private, root, round_index)
                runs[pair, private].append(res)
                what = f"{LABELS[pair][int(private)]:<24} round {round_index + 1}/{args.rounds}"
                if "error" in res:
                    print(f"# {what} FAILED: {res['error']}  (log: {res.get('log', '-')})", file=sys.stderr, flush=True)
                    continue
                ms = [1000 * t for t in res["per_step"]]
                print(
                    f"# {what} median {statistics.median(ms):.1f} ms (min {min(ms):.1f}, max {max(ms):.1f}), "
                    f"examples/step {statistics.mean(res['real']):.1f}, rows/step {statistics.mean(res['rows']):.1f}, "
                    f"peak RSS {res['rss_mb']:.0f} MB ({res['train_mb']:.0f} MB above the start of fit), "
                    f"run {res['wall_s']:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    results = {key: _pooled(value) for key, value in runs.items()}

    params = next((r["params"] for r in results.values() if "params" in r), None)
    print(
        f"\nGPT T={args.T}, D={args.D}, {args.layers} layers, 4 heads, V={args.vocab}, tied head "
        f"({params} parameters), N={args.N}; AdamW, fp32; 2 CPU processes (gloo, 1 thread each); B={args.batch} "
        f"examples per logical step (non-private: {args.batch // 2} per rank"
        f"{f' in micro-batches of {args.physical}' if args.accumulate else ''}; DP: Poisson with E = {args.batch}, "
        f"physical batch {args.physical} per rank, sigma=1, C=1); median of {args.steps} steps after "
        f"{args.burn_in} burn-in, pooled over {args.rounds} interleaved round(s). "
        f"FSDP DP sharding: {args.fsdp_dp_sharding}. Clipping: {args.style}"
        f"{f' ({args.groups} groups)' if args.style == 'group-wise' else ''}"
        f"{'; clipped sums buffered (one reduce per step)' if args.buffered else ''}.\n"
    )
    print(
        "| strategy | non-private ms | DP ms | DP / non-private | target | examples/step non-private / DP "
        "(DP rows incl. padding) | peak RSS MB non-private / DP | memory ratio (target <= 1.2) | "
        "MB above the start of fit, non-private / DP |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    notes = []
    for pair in pairs:
        base, dp = results[pair, False], results[pair, True]
        name = f"{LABELS[pair][1]} vs {LABELS[pair][0]}"
        for label, r in ((LABELS[pair][0], base), (LABELS[pair][1], dp)):
            if "error" in r:
                notes.append(f"- {label}: n/a: {r['error']}")
        b_ms, d_ms = base.get("ms"), dp.get("ms")
        ratio = d_ms / b_ms if b_ms and d_ms else None
        b_mem, d_mem = base.get("rss_mb"), dp.get("rss_mb")
        mem_ratio = d_mem / b_mem if b_mem and d_mem else None
        examples = f"{_fmt(base.get('real'), '.1f')} / {_fmt(dp.get('real'), '.1f')} ({_fmt(dp.get('rows'), '.1f')})"
        print(
            f"| {name} | {_fmt(b_ms, '.1f')} | {_fmt(d_ms, '.1f')} | {_fmt(ratio, '.2f')} | "
            f"{_time_target(pair, args.T)} | {examples} | "
            f"{_fmt(b_mem, '.0f')} / {_fmt(d_mem, '.0f')} | "
            f"{_fmt(mem_ratio, '.2f')} | {_fmt(base.get('train_mb'), '.0f')} / {_fmt(dp.get('train_mb'), '.0f')} |"
        )
    if args.rounds > 1:
        print("\nmedian of each round (ms), non-private / DP:")
        for pair in pairs:
            base, dp = results[pair, False], results[pair, True]
            per_round = [" ".join(f"{x:.0f}" for x in r.get("round_ms", [])) for r in (base, dp)]
            print(f"- {LABELS[pair][1]}: {per_round[0]} / {per_round[1]}")
    if notes:
        print("\nn/a reasons:\n" + "\n".join(notes))
    print(f"\nlogs: {root}; total {time.perf_counter() - t_start:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pair", help=argparse.SUPPRESS)
    parser.add_argument("--private", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument(
        "--pairs", default=",".join(PAIRS), help=f"comma-separated, from {','.join(LABELS)} (default: the first five)"
    )
    parser.add_argument("--batch", type=int, default=32, help="B: (expected) examples per logical step, all ranks")
    parser.add_argument("--physical", type=int, default=None, help="DP physical batch size per rank (default B/2)")
    parser.add_argument("--steps", type=int, default=12, help="timed steps")
    parser.add_argument("--burn-in", type=int, default=3, help="untimed steps first")
    parser.add_argument("--T", type=int, default=64)
    parser.add_argument("--D", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=64)
    parser.add_argument("--N", type=int, default=4096, help="training examples")
    parser.add_argument("--style", default="all-layer", choices=("all-layer", "layer-wise", "param-wise", "group-wise"))
    parser.add_argument("--groups", type=int, default=2, help="--style group-wise: contiguous groups of modules")
    parser.add_argument(
        "--buffered",
        action="store_true",
        help="dp_zero3 / dp_fsdp: sum the clipped sums in a full-size buffer and reduce-scatter once per logical step "
        "(stream_clipped_sums=False) instead of once per physical batch",
    )
    parser.add_argument(
        "--accumulate",
        action="store_true",
        help="non-private: micro-batches of --physical rows per rank, accumulated (accumulate_grad_batches) to B/2 per "
        "rank per optimizer step, as when B/2 rows do not fit at once; the DP run is unchanged",
    )
    parser.add_argument("--fsdp-dp-sharding", choices=("block", "own"), default="block")
    parser.add_argument(
        "--rounds", type=int, default=1, help="run every configuration this many times, interleaved; steps pooled"
    )
    parser.add_argument("--timeout", type=int, default=300, help="seconds per configuration")
    parser.add_argument("--logs", default=None, help="folder for per-run logs and JSON (default: a temp folder)")
    args = parser.parse_args()
    if args.physical is None:
        args.physical = args.batch // 2
    if args.accumulate and (args.batch // 2) % args.physical:
        raise SystemExit(f"--accumulate: B/2 = {args.batch // 2} must be a multiple of --physical {args.physical}")
    if args.worker:
        _worker(args)
    else:
        _launch(args)


if __name__ == "__main__":
    main()
