"""One-run privacy audits at benchmark size: the correct implementation against deliberately broken ones.

    python examples/benchmarks/audit.py                                   # dp, claims 2 4 8, m = 5000, T = 200
    python examples/benchmarks/audit.py --epsilons 2 --canaries 2000 --steps 100 --seeds 0 1 2
    torchrun --standalone --nproc_per_node 2 examples/benchmarks/audit.py --strategy dp_zero3 --epsilons 2 \
        --variants ok noise_on_rank_zero_only

For each claimed epsilon (sigma calibrated by the library for the run) and each variant, trains once with m white-box
gradient canaries (lightning_dpzero.audit) and prints a markdown table of the claim, the 95% lower bound and whether
the bound exceeds the claim. Variants: ``ok`` (the library as shipped) and the bug injectors of tests/audit/broken.py
(``scaled_noise`` at 0.1 and 0.5 of the std, ``no_clipping``, ``shuffled_batches``, ``noise_on_rank_zero_only``),
which are test helpers, imported from the repository checkout. The task is a small MLP regression on n random
examples; the canaries do not depend on it.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_dpzero as dpz  # noqa: E402
from lightning_dpzero.audit import AuditConfig, run_audit  # noqa: E402
from tests.audit.broken import BROKEN  # noqa: E402

VARIANTS = {
    "ok": contextlib.nullcontext,
    "scaled_noise_0.1": functools.partial(BROKEN["scaled_noise"], 0.1),
    "scaled_noise_0.5": functools.partial(BROKEN["scaled_noise"], 0.5),
    "no_clipping": BROKEN["no_clipping"],
    "shuffled_batches": BROKEN["shuffled_batches"],
    "noise_on_rank_zero_only": BROKEN["noise_on_rank_zero_only"],
}


class Regression(L.LightningModule):
    def __init__(self, n: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(n, 16, generator=g)
        self.data = TensorDataset(x, x.sum(1, keepdim=True) + 0.1 * torch.randn(n, 1, generator=g))
        self.net = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self.net(x) - y).pow(2).squeeze(-1)  # [p]

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def audit_once(args: argparse.Namespace, epsilon: float, variant: str, seed: int) -> tuple[float, float, float]:
    """(claimed epsilon, lower bound, seconds) of one audit."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    privacy = dpz.PrivacyConfig(
        target_epsilon=epsilon,
        delta=args.delta,
        expected_batch_size=args.batch,
        physical_batch_size=args.physical,
        seed=seed,
    )
    strategies = {
        "dp": lambda: dpz.DPStrategy(privacy),
        "dp_ddp": lambda: dpz.DPDDPStrategy(privacy, process_group_backend="gloo"),
        "dp_zero3": lambda: dpz.DPZeroStrategy(stage=3, privacy=privacy, process_group_backend="gloo"),
    }
    trainer = L.Trainer(
        accelerator="cpu",
        devices=world,
        strategy=strategies[args.strategy](),
        max_steps=args.steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    model = Regression(args.examples)
    start = time.perf_counter()
    with VARIANTS[variant]():
        result = run_audit(
            model,
            DataLoader(model.data, batch_size=args.batch, shuffle=True),
            trainer=trainer,
            config=AuditConfig(num_canaries=args.canaries, seed=seed),
        )
    return result.claimed_epsilon, result.epsilon_lower_bound, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--strategy", choices=["dp", "dp_ddp", "dp_zero3"], default="dp")
    parser.add_argument("--epsilons", type=float, nargs="+", default=[2.0, 4.0, 8.0])
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=[v for v in VARIANTS if "rank" not in v]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the `ok` variant")
    parser.add_argument("--canaries", type=int, default=5000)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--examples", type=int, default=1000, help="n, the task's own examples")
    parser.add_argument("--batch", type=int, default=100, help="B, the expected logical batch")
    parser.add_argument("--physical", type=int, default=128)
    parser.add_argument("--delta", type=float, default=1e-6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for epsilon in args.epsilons:
        for variant in args.variants:
            for seed in args.seeds if variant == "ok" else args.seeds[:1]:
                claimed, bound, seconds = audit_once(args, epsilon, variant, seed)
                rows.append((epsilon, variant, seed, claimed, bound, seconds))
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(
        f"\nstrategy={args.strategy}, m={args.canaries} canaries, T={args.steps} steps, n={args.examples}, "
        f"B={args.batch}, delta={args.delta:g}, 95% confidence; torch {torch.__version__}, {os.cpu_count()} CPUs\n"
    )
    print("| target eps | variant | seed | claimed eps | lower bound (95%) | exceeds claim | s |")
    print("|---|---|---|---|---|---|---|")
    for epsilon, variant, seed, claimed, bound, seconds in rows:
        verdict = "**yes**" if bound > claimed else "no"
        print(f"| {epsilon:g} | {variant} | {seed} | {claimed:.3f} | {bound:.3f} | {verdict} | {seconds:.1f} |")


if __name__ == "__main__":
    main()
