"""dp_zero3 runs torch's own linear: DeepSpeed's memory-efficient linear would compute weight gradients DP discards."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import lightning_dpzero as dpz
from lightning_dpzero.clipping import ClippingEngine

_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class _MatmulShapes(TorchDispatchMode):
    """Records the output shape of every matmul dispatched while active."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func in _MATMULS:
            self.shapes.append(tuple(out.shape))
        return out


def _backward_matmuls(linear_fn, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, ...]]:
    """Output shapes of the matmuls of the engine's per-example backward of a Linear(6, 5) on [4, 3, 6] inputs,
    with ``F.linear`` replaced by ``linear_fn``."""
    monkeypatch.setattr(torch.nn.functional, "linear", linear_fn)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 2))
    engine = ClippingEngine(model, dpz.PrivacyConfig(noise_multiplier=1.0, norm_mode="ghost"))
    engine.attach()
    with engine.recording(torch.device("cpu")):
        loss = model(torch.randn(4, 3, 6)).square().sum()
    with _MatmulShapes() as seen:
        engine.backward(loss, torch.ones(4))
    return seen.shapes


def test_per_example_backward_skips_weight_gradients_with_torch_linear(monkeypatch: pytest.MonkeyPatch) -> None:
    """Reference: the weight gradients of Linear(6, 5) and Linear(5, 2) have shapes (5, 6) and (2, 5). With ghost
    norms, the only weight-shaped matmul per layer under torch's linear is the clipped sum sum_t b_t^T (c a)_t
    (autograd is asked for output gradients only); DeepSpeed's ZeRO-3 linear, an autograd Function, also computes
    the plain weight gradient of every layer whose backward runs (all but the lowest: the per-example backward stops
    at the lowest tap), which is thrown away."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap

    def weight_shaped(shapes: list[tuple[int, ...]]) -> Counter:
        return Counter(s for s in shapes if s in {(5, 6), (2, 5)})

    torch_linear = weight_shaped(_backward_matmuls(torch.nn.functional.linear, monkeypatch))
    assert torch_linear == Counter({(5, 6): 1, (2, 5): 1})
    deepspeed_linear = weight_shaped(_backward_matmuls(zero3_linear_wrap, monkeypatch))
    assert deepspeed_linear == Counter({(5, 6): 1, (2, 5): 2})


def test_dp_zero3_turns_off_memory_efficient_linear() -> None:
    """Lightning's default stage-3 config (and a user config without the key) gets memory_efficient_linear=False, so
    zero.Init leaves F.linear alone; stages 1 and 2 never replace it."""
    assert dpz.DPZeroStrategy(stage=3).config["zero_optimization"]["memory_efficient_linear"] is False
    user = dpz.DPZeroStrategy(stage=3, config={"zero_optimization": {"stage": 3}, "train_micro_batch_size_per_gpu": 1})
    assert user.config["zero_optimization"]["memory_efficient_linear"] is False
    assert "memory_efficient_linear" not in dpz.DPZeroStrategy(stage=2).config["zero_optimization"]


def test_dp_zero3_warns_when_the_user_asks_for_memory_efficient_linear() -> None:
    config = {"zero_optimization": {"stage": 3, "memory_efficient_linear": True}, "train_micro_batch_size_per_gpu": 1}
    with pytest.warns(UserWarning, match="memory_efficient_linear=true.*wasted matmul"):
        strategy = dpz.DPZeroStrategy(stage=3, config=config)
    assert strategy.config["zero_optimization"]["memory_efficient_linear"] is True  # the user's choice stands


def test_dp_zero3_undoes_an_earlier_zero_init_replacement(monkeypatch: pytest.MonkeyPatch) -> None:
    """zero.Init replaces F.linear for the rest of the process; a dp_zero3 run after a non-private ZeRO-3 run (a
    Hydra multirun) puts torch's back before training."""
    from deepspeed.runtime.zero.linear import zero3_linear_wrap
    from deepspeed.runtime.zero.partition_parameters import InsertPostInitMethodToModuleSubClasses

    from lightning_dpzero._internals.deepspeed import restore_torch_linear

    original = torch.nn.functional.linear
    monkeypatch.setattr(InsertPostInitMethodToModuleSubClasses, "linear_bk", original, raising=False)
    monkeypatch.setattr(torch.nn.functional, "linear", zero3_linear_wrap)
    restore_torch_linear()
    assert torch.nn.functional.linear is original
