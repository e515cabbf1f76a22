"""Zeroth-order vs first-order DP on the GPT task: memory, time per logical step, loss after a budget of forwards.

Commands::

    python examples/benchmarks/zo_vs_first_order.py                          # CPU, budget of 400 forward passes
    python examples/benchmarks/zo_vs_first_order.py --budget 1000 --epsilon 3
    python examples/benchmarks/zo_vs_first_order.py --device cuda --n-embd 256 --n-layer 4

Every mode trains a fresh copy of the same initial GPT (``lightning_dpzero.tasks.gpt``, tied embeddings) on the
embedded arithmetic corpus with the ``"dp"`` strategy, sigma calibrated for the same epsilon over that mode's own
number of logical steps, B = p (about one physical batch per logical step). Modes:

- ``first-order DP-SGD``: per-example clipping (automatic), AdamW (the task's optimizer and lr).
- ``ZO (DPZero)``: ``method="zeroth_order"``, P = 1 direction, constant beta and eta.
- ``ZO (DP-ZOSO, 3 stages)``: stage lengths T0 2^s, eta halved and beta divided by 2 per stage.
- ``ZO (DP-ZOPO, 10% SynFlow)``: DP-ZOSO on the 10% of coordinates with the lowest SynFlow scores.

The budget counts forward passes of one physical batch: a first-order step costs 1 (plus its backward), a ZO step
2P. So first-order runs ``budget`` logical steps and ZO ``budget / 2P``; the table gives the forwards actually run
(Poisson batches sometimes need a second physical batch) and the validation loss after them.

Measures:

- ``step ms``: median wall time of a logical step (after 3 burn-in steps), measured by a callback around Lightning's
  whole training step (forward(s), backward, noise, update).
- ``peak MB`` = static tensors at the step's start (parameters, buffers, optimizer state, gradients held) + the peak
  of tensor memory allocated during the step above its start. On CPU the allocator keeps no statistics: step 5 runs
  under ``torch.profiler`` with ``profile_memory=True`` and the peak is the running sum of its allocation and free
  events (every tensor PyTorch allocates; not process RSS, which glibc's retained heap would blur). On CUDA,
  ``max_memory_allocated`` - ``memory_allocated`` at the step's start.
- ``inference MB``: the same for one ``torch.no_grad()`` forward of one physical batch (parameters + its working
  memory): the target of docs/design.md is ZO peak / inference peak <= 1.15.
"""

from __future__ import annotations

import argparse
import gc
import math
import platform
import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback

import lightning_dpzero as dpz
from lightning_dpzero.tasks.gpt import GPTTask, SyntheticArithmeticDataModule


class BenchTask(GPTTask):
    """The GPT task with a ``forward`` and an ``example_input_array`` (SynFlow needs the input shape)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.example_input_array = torch.ones(1, self.hparams.block_size, dtype=torch.long)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.model(idx)


def _tensor_bytes(tensors: list[torch.Tensor]) -> int:
    seen, total = set(), 0
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in seen:
            seen.add(t.untyped_storage().data_ptr())
            total += t.untyped_storage().nbytes()
    return total


def _static_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer | None) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    tensors += [p.grad for p in module.parameters() if p.grad is not None]
    if optimizer is not None:
        tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    return _tensor_bytes(tensors)


class _Peak:
    """Working-memory peak of a code region above what was live at its start (see the module docstring)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.bytes = device, 0
        self._prof: Any = None

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
        else:
            from torch.profiler import ProfilerActivity, profile

            self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
            self._prof.__enter__()

    def stop(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self._base
            return
        self._prof.__exit__(None, None, None)
        events = sorted(
            (e for e in self._prof.profiler.kineto_results.events() if e.name() == "[memory]"),
            key=lambda e: e.start_ns(),
        )
        live = peak = 0
        for event in events:
            live += event.nbytes()
            peak = max(peak, live)
        self.bytes = peak


class Measure(Callback):
    """Step times, and static + working memory of one step (the ``profile_step``-th)."""

    def __init__(self, device: torch.device, profile_step: int = 5, burn_in: int = 3) -> None:
        self.device, self.profile_step, self.burn_in = device, profile_step, burn_in
        self.times: list[float] = []
        self.physical_batches = 0
        self.static = self.working = 0
        self._peak = _Peak(device)
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.physical_batches += len(batch.masks)
        if batch_idx == self.profile_step:
            optimizer = trainer.optimizers[0] if trainer.optimizers else None
            optimizer.zero_grad(set_to_none=True)  # Lightning does it inside the step: counted in the working peak
            self.static = _static_bytes(pl_module, optimizer)
            self._peak.start()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - self._t0
        if batch_idx == self.profile_step:
            self._peak.stop()
            self.working = self._peak.bytes
        elif batch_idx >= self.burn_in:
            self.times.append(elapsed)


@dataclass
class Row:
    label: str
    steps: int = 0
    forwards: int = 0
    step_ms: float = math.nan
    peak_mb: float = math.nan
    val_loss: float = math.nan
    epsilon: float = math.nan
    sigma: float = math.nan
    extra: dict[str, Any] = field(default_factory=dict)


def inference_peak_mb(task: BenchTask, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device) -> float:
    task = task.to(device)
    x, y = (t.to(device) for t in batch)
    peak = _Peak(device)
    task.eval()
    with torch.no_grad():
        task.per_example_loss((x, y))  # warm-up: first-call allocations
        peak.start()
        task.per_example_loss((x, y))
        peak.stop()
    return (_static_bytes(task, None) + peak.bytes) / 2**20


def run(label: str, args: argparse.Namespace, privacy: dpz.PrivacyConfig, steps: int, device: torch.device) -> Row:
    L.seed_everything(args.seed)
    data = SyntheticArithmeticDataModule(num_train=args.num_train, block_size=args.block_size, batch_size=args.batch)
    task = BenchTask(block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    measure = Measure(device)
    trainer = L.Trainer(
        accelerator=device.type,
        devices=1,
        strategy=dpz.DPStrategy(privacy),
        max_steps=steps,
        callbacks=[measure],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    trainer.fit(task, datamodule=data)
    dp = trainer.strategy.dp
    val = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False)
    loss = val.validate(task, datamodule=data, verbose=False)[0]["val_loss"]
    per_step = 2 * privacy.zeroth_order.num_directions if privacy.zeroth_order is not None else 1
    return Row(
        label,
        steps=trainer.global_step,
        forwards=measure.physical_batches * per_step,
        step_ms=statistics.median(measure.times) * 1e3 if measure.times else math.nan,
        peak_mb=(measure.static + measure.working) / 2**20,
        val_loss=float(loss),
        epsilon=dp.epsilon(),
        sigma=float(dp.ledger.noise_multiplier),
        extra={"trainable": getattr(dp, "num_trainable", sum(p.numel() for p in task.parameters()))},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget", type=int, default=400, help="forward passes of one physical batch, per mode")
    parser.add_argument("--epsilon", type=float, default=8.0)
    parser.add_argument("--batch", type=int, default=32, help="B = p")
    parser.add_argument("--block-size", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=2)
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--num-train", type=int, default=4096)
    parser.add_argument("--zo-lr", type=float, default=3e-3)
    parser.add_argument("--zo-beta", type=float, default=1e-3)
    parser.add_argument("--zo-clip", type=float, default=2.0)
    parser.add_argument("--directions", type=int, default=1)
    parser.add_argument("--modes", default="fo,zo,zoso,zopo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    base = dict(target_epsilon=args.epsilon, expected_batch_size=args.batch, physical_batch_size=args.batch, seed=1)
    zo_steps = max(1, args.budget // (2 * args.directions))
    stage_length = max(1, zo_steps // 7)  # three stages of T0, 2 T0, 4 T0 steps
    zo_common = dict(clip_norm=args.zo_clip, clipping_function="abadi", method="zeroth_order")

    def zo(**settings: Any) -> dpz.ZerothOrderConfig:
        return dpz.ZerothOrderConfig(num_directions=args.directions, **settings)

    zoso = dict(
        num_stages=3,
        stage_length=stage_length,
        perturbation_scale=(args.zo_beta, args.zo_beta / 2, args.zo_beta / 4),
        learning_rate=(2 * args.zo_lr, args.zo_lr, args.zo_lr / 2),
    )
    plans = {
        "fo": ("first-order DP-SGD (AdamW)", dpz.PrivacyConfig(**base), args.budget),
        "zo": (
            f"ZO (DPZero, P={args.directions})",
            dpz.PrivacyConfig(
                **base, **zo_common, zeroth_order=zo(perturbation_scale=args.zo_beta, learning_rate=args.zo_lr)
            ),
            zo_steps,
        ),
        "zoso": (
            "ZO (DP-ZOSO, 3 stages)",
            dpz.PrivacyConfig(**base, **zo_common, zeroth_order=zo(**zoso)),
            zo_steps,
        ),
        "zopo": (
            "ZO (DP-ZOPO, 10% SynFlow)",
            dpz.PrivacyConfig(
                **base,
                **zo_common,
                zeroth_order=zo(
                    **{**zoso, "learning_rate": tuple(3 * v for v in zoso["learning_rate"])}, prune_keep_fraction=0.1
                ),
            ),
            zo_steps,
        ),
    }
    rows = []
    for key in args.modes.split(","):
        label, privacy, steps = plans[key]
        rows.append(run(label, args, privacy, steps, device))

    L.seed_everything(args.seed)
    data = SyntheticArithmeticDataModule(num_train=args.num_train, block_size=args.block_size, batch_size=args.batch)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    task = BenchTask(block_size=args.block_size, n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head)
    inference = inference_peak_mb(task, batch, device)
    untrained = L.Trainer(accelerator=device.type, devices=1, logger=False, enable_progress_bar=False)
    initial_loss = untrained.validate(task, datamodule=data, verbose=False)[0]["val_loss"]

    cpu = platform.processor() or platform.machine()
    print(
        f"\nGPT (T={args.block_size}, D={args.n_embd}, {args.n_layer} layers, tied head), B = p = {args.batch}, "
        f"epsilon = {args.epsilon}, budget {args.budget} forward passes; {device.type} ({cpu}, "
        f"{torch.get_num_threads()} threads), torch {torch.__version__}; inference peak {inference:.2f} MB, "
        f"val loss before training {initial_loss:.3f}\n"
    )
    header = ("mode", "trainable", "steps", "forwards", "step ms", "peak MB", "peak / inference", "val loss", "sigma")
    table = [header]
    for r in rows:
        table.append(
            (
                r.label,
                f"{r.extra['trainable']:,}",
                str(r.steps),
                str(r.forwards),
                f"{r.step_ms:.1f}",
                f"{r.peak_mb:.2f}",
                f"{r.peak_mb / inference:.2f}",
                f"{r.val_loss:.3f}",
                f"{r.sigma:.3f}",
            )
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        cells = [c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))]
        print("| " + " | ".join(cells) + " |")
        if i == 0:
            print("|" + "|".join(("-" * (w + 1) + ":") if j else "-" * (w + 2) for j, w in enumerate(widths)) + "|")


if __name__ == "__main__":
    main()
