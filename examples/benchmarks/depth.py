"""How the clipping engine's step grows with a model's depth: it should grow as the non-private step does, linearly.

Commands::

    python examples/benchmarks/depth.py                              # 16, 64 and 128 blocks, all-layer and layer-wise
    python examples/benchmarks/depth.py --depths 8,32 --styles all-layer

The model: a convolution of 3 -> 64 channels, then ``depth`` blocks of GroupNorm(8), ReLU and a 64 -> 64 3x3
convolution, average pooling and a linear head, on 4x4 inputs, 16 examples. Every block's convolution has 16
positions and 64 x 576 weights per example, so its norm mode is deferred (contributions.Contribution.deferred) and the
engine follows its memory bound at every tap, the bookkeeping whose cost must not grow with what it holds.

Timing: the engine's step (forward, backward, clipped sums; no optimizer) against a non-private forward and
backward of the same model, one step of each in turn (2 threads, freed memory retained), the median over ``--steps``
steps after 3 of warm-up; the table gives both, their ratio, and the DP step per block.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from lightning_dpzero import retain_freed_memory
from lightning_dpzero.clipping import ClippingEngine
from lightning_dpzero.config import PrivacyConfig

ROWS = 16


def make_model(depth: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, padding=1)]
    for _ in range(depth):
        layers += [nn.GroupNorm(8, 64), nn.ReLU(), nn.Conv2d(64, 64, 3, padding=1)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


def measure(depth: int, style: str, steps: int) -> tuple[float, float]:
    """(DP step ms, non-private step ms), medians."""
    torch.manual_seed(0)
    model = make_model(depth)
    plain = copy.deepcopy(model)
    x, y = torch.randn(ROWS, 3, 4, 4), torch.randint(0, 10, (ROWS,))
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0, clipping_style=style))
    engine.attach()
    mask = torch.ones(ROWS, dtype=torch.bool)

    def dp() -> None:
        with engine.recording(x.device, rows=ROWS):
            loss = F.cross_entropy(model(x), y, reduction="none").sum()
        engine.backward(loss, mask)
        engine.pop_summed()

    def non_private() -> None:
        F.cross_entropy(plain(x), y).backward()
        plain.zero_grad(set_to_none=True)

    times: dict[str, list[float]] = {"dp": [], "np": []}
    for i in range(steps + 3):
        for name, step in (("dp", dp), ("np", non_private)):
            start = time.perf_counter()
            step()
            if i >= 3:
                times[name].append(time.perf_counter() - start)
    return 1000 * statistics.median(times["dp"]), 1000 * statistics.median(times["np"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depths", default="16,64,128", help="comma-separated numbers of blocks")
    parser.add_argument("--styles", default="all-layer,layer-wise", help="comma-separated clipping styles")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per depth and style")
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(2)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, {ROWS} examples of 3x4x4, {args.steps} steps\n")
    print("| style | blocks | DP step ms | non-private ms | DP / non-private | DP ms per block |")
    print("|---|---|---|---|---|---|")
    for style in args.styles.split(","):
        for depth in (int(d) for d in args.depths.split(",")):
            dp, non_private = measure(depth, style, args.steps)
            print(f"| {style} | {depth} | {dp:.1f} | {non_private:.1f} | {dp / non_private:.2f} | {dp / depth:.2f} |")


if __name__ == "__main__":
    main()
