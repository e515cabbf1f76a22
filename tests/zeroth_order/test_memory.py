"""Zeroth-order DP at inference memory: peak tensor memory over 100 logical steps vs one inference forward pass.

Measured with ``torch.profiler`` (``profile_memory=True``): the running sum of the CPU allocator's allocation and free
events is the live tensor memory at each instant, so its maximum is the peak above what was live when profiling
began. That sees every tensor PyTorch allocates and nothing else (process RSS would be blurred by the heap glibc
keeps between phases, and ``tracemalloc`` does not see PyTorch's allocations at all). Peak memory = the static
tensors (parameters and buffers) + that peak.
"""

from __future__ import annotations

import gc

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils.data import DataLoader, TensorDataset

from lightning_dpzero.config import PrivacyConfig, ZerothOrderConfig
from lightning_dpzero.strategies.reducers import LocalReducer
from lightning_dpzero.tasks.gpt import GPT, GPTConfig
from lightning_dpzero.zeroth_order import ZOStep


def _live_bytes_trace(prof: profile) -> tuple[list[tuple[int, int]], dict[str, tuple[int, int]]]:
    """(time, live bytes after each allocator event) and name -> (start, end) of the recorded ranges."""
    events = list(prof.profiler.kineto_results.events())
    memory = sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live, trace = 0, []
    for event in memory:
        live += event.nbytes()
        trace.append((event.start_ns(), live))
    ranges = {e.name(): (e.start_ns(), e.end_ns()) for e in events if e.name().startswith("zo_step_")}
    return trace, ranges


def _peak(trace: list[tuple[int, int]], lo: int = 0, hi: int = 2**63) -> int:
    return max((live for t, live in trace if lo <= t <= hi), default=0)


def test_peak_memory_is_inference_memory_and_does_not_grow() -> None:
    """Reference: DESIGN.md section 5: (static + ZO working peak over 100 steps) / (static + inference working peak)
    <= 1.15; the working peak of steps 91-100 is not above that of steps 1-10 and live memory does not grow."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=15, block_size=32, n_layer=2, n_head=4, n_embd=48))
    tokens = torch.randint(0, 15, (8, 33), generator=torch.Generator().manual_seed(0))  # [p, T + 1]
    x, y = tokens[:, :-1], tokens[:, 1:]

    def losses() -> Tensor:
        return F.cross_entropy(model(x).transpose(1, 2), y, reduction="none").mean(1)  # [p]

    static = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    gc.collect()
    reducer = LocalReducer(torch.device("cpu"), "test")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        model.eval()
        losses()
        model.train()
    inference = _peak(_live_bytes_trace(prof)[0])

    privacy = PrivacyConfig(
        noise_multiplier=1.0,
        clip_norm=1.0,
        expected_batch_size=8,
        physical_batch_size=8,
        seed=0,
        method="zeroth_order",
        zeroth_order=ZerothOrderConfig(learning_rate=1e-4, num_directions=2, proximal_weight=0.0),
    )
    step = ZOStep(privacy)
    step.ledger.bind_data(DataLoader(TensorDataset(x), batch_size=8), planned_steps=lambda n: None, owner="test")
    step.attach(model)
    mask = torch.ones(8)
    step.forward_differences(losses, mask)  # one step outside the profile: first-call allocations and caches
    step.finish_step(None, LocalReducer(torch.device("cpu"), "test"))
    gc.collect()
    reducer = LocalReducer(torch.device("cpu"), "test")
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for k in range(100):
            with record_function(f"zo_step_{k}"):
                step.forward_differences(losses, mask)
                step.finish_step(None, reducer)
    trace, ranges = _live_bytes_trace(prof)
    zo = _peak(trace)
    first = max(_peak(trace, *ranges[f"zo_step_{k}"]) for k in range(10))
    last = max(_peak(trace, *ranges[f"zo_step_{k}"]) for k in range(90, 100))
    end_live = [next((v for t, v in reversed(trace) if t <= ranges[f"zo_step_{k}"][1]), 0) for k in (0, 99)]
    ratio = (static + zo) / (static + inference)
    print(
        f"static {static / 2**20:.2f} MiB, inference working {inference / 2**20:.2f} MiB, ZO working "
        f"{zo / 2**20:.2f} MiB (steps 1-10: {first / 2**20:.2f}, 91-100: {last / 2**20:.2f}), ratio {ratio:.3f}, "
        f"live after step 1 / 100: {end_live[0]} / {end_live[1]} bytes"
    )
    assert ratio <= 1.15
    assert last <= first
    assert end_live[1] <= end_live[0]
    assert step.ledger.accountant.steps == 101
