"""The clipping engine's fixed cost per step: what it adds to a step whose arithmetic is negligible.

Commands::

    python examples/benchmarks/fixed_cost.py                  # tiny gpt and cnn, ~1 min
    python examples/benchmarks/fixed_cost.py --models gpt --steps 3000

The models of ``step_time.py`` at sizes where every operator is a few microseconds (gpt: T = 16, D = 16, 2 layers,
2 examples; cnn: 4x4 inputs, 2 examples), so that what the engine adds is its Python and its operators' dispatch:
the taps in the forward, the rules, norms and clipped sums in the backward. Printed per model: the number of hooked
layers, the engine's step (forward, backward, clipped sums; no optimizer) minus a non-private forward and backward of
the same model, at the 10th and 25th percentiles of ``--steps`` steps of each in turn (1 thread, freed memory
retained; low percentiles, because this is a small difference of two noisy times), and that difference per layer;
then the operators the engine's step dispatches beyond the non-private step's (counted, so free of the machine's
noise: each costs a few microseconds of dispatch whatever its size), in all and per layer, for all-layer and
layer-wise clipping.
On a model of real size the same cost adds to the step's arithmetic: compare runs of this script before and after
a change to the engine's bookkeeping.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import profile_step  # noqa: E402
import step_time  # noqa: E402

from lightning_dpzero import retain_freed_memory  # noqa: E402
from lightning_dpzero.clipping import ClippingEngine  # noqa: E402
from lightning_dpzero.config import PrivacyConfig  # noqa: E402


def tiny(name: str) -> step_time.Bench:
    gen = torch.Generator().manual_seed(1)
    if name == "gpt":
        cfg = step_time.GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=16)
        tokens = torch.randint(0, cfg.vocab_size, (2, cfg.block_size + 1), generator=gen)
        batch = (tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous())
        model = step_time.GPT(cfg)
        title = "gpt (T=16, D=16, 2 layers), p=2"
        return step_time.Bench("gpt", title, model, batch, step_time._token_losses, step_time._token_ghost)
    batch = (torch.randn(2, 3, 4, 4, generator=gen), torch.randint(0, 10, (2,), generator=gen))
    model = step_time.GroupNormCNN()
    return step_time.Bench("cnn", "cnn (4x4x3), p=2", model, batch, step_time._class_losses, step_time._class_ghost)


class _Count(TorchDispatchMode):
    """Counts the operators dispatched inside it (those called from Python and from autograd's backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.calls += 1
        return func(*args, **(kwargs or {}))


def operators(step: object) -> int:
    """The operators one call of ``step`` dispatches (after a call to warm it)."""
    step()  # type: ignore[operator]
    with _Count() as count:
        step()  # type: ignore[operator]
    return count.calls


def styles(bench: step_time.Bench) -> dict[str, int]:
    """Operators of one engine step beyond the non-private step's, per clipping style."""
    steps = profile_step._phases(bench, 1)["_steps"]  # type: ignore[index]
    base = operators(steps["non-private"])  # type: ignore[index]
    out = {}
    p = bench.batch[0].shape[0]
    mask = torch.ones(p, dtype=torch.bool)
    for style in ("all-layer", "layer-wise"):
        model = copy.deepcopy(bench.model)
        engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0, clipping_style=style))
        engine.attach()

        def step(engine: ClippingEngine = engine, model: torch.nn.Module = model) -> None:
            with engine.recording(mask.device, rows=p):
                loss = bench.per_example_losses(model, bench.batch).sum()
            engine.backward(loss, mask)
            engine.pop_summed()

        out[style] = operators(step) - base
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--models", default="gpt,cnn")
    parser.add_argument("--steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    retain_freed_memory()
    print("| model | hooked layers | added ms per step (p10) | (p25) | added us per layer (p10) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        bench = tiny(name)
        steps = profile_step._phases(bench, 3)["_steps"]  # type: ignore[index]
        times: dict[str, list[float]] = {"non-private": [], "ours": []}
        for i in range(args.steps):
            for mode in ("non-private", "ours") if i % 2 else ("ours", "non-private"):
                start = time.perf_counter()
                steps[mode]()  # type: ignore[operator]
                times[mode].append(time.perf_counter() - start)
        q = {mode: sorted(v) for mode, v in times.items()}
        p10, p25 = ((q["ours"][k] - q["non-private"][k]) * 1000 for k in (args.steps // 10, args.steps // 4))
        layers = sum(1 for m in bench.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
        print(f"| {bench.title} | {layers} | {p10:.2f} | {p25:.2f} | {1000 * p10 / layers:.0f} |")
    print("\n| model | hooked layers | added operators per step, all-layer | per layer | layer-wise | per layer |")
    print("|---|---|---|---|---|---|")
    for name in args.models.split(","):
        bench = tiny(name)
        layers = sum(1 for m in bench.model.modules() if any(p.requires_grad for p in m.parameters(recurse=False)))
        counts = styles(bench)
        print(f"| {bench.title} | {layers} | {counts['all-layer']} | {counts['all-layer'] / layers:.1f} | "
              f"{counts['layer-wise']} | {counts['layer-wise'] / layers:.1f} |")  # fmt: skip


if __name__ == "__main__":
    main()
