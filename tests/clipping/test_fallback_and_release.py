"""The opt-in torch.func fallback and the early release of layer-/group-wise clipping."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_dpzero.clipping import ClippingEngine, UnsupportedLayerError
from lightning_dpzero.config import PrivacyConfig
from tests.reference import reference_clipped_sum

CPU = torch.device("cpu")


class WithPReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 6)
        self.act = nn.PReLU(6)
        self.out = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.act(self.fc(x)))


def ce(model: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_functorch_fallback_matches_reference(style: str) -> None:
    """Reference: tests/reference.py; PReLU has no rule and goes through torch.func (the default; refused when
    switched off)."""
    torch.manual_seed(0)
    model = WithPReLU()
    x, y = torch.randn(6, 5), torch.randint(0, 3, (6,))
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool)
    with pytest.raises(UnsupportedLayerError, match="act"):
        ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, functorch_fallback=False))
    engine = ClippingEngine(
        model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.2, clipping_style=style, functorch_fallback=True)
    )
    engine.attach()
    with engine.recording(CPU):
        loss = ce(model, (x, y)).sum()
    engine.backward(loss, mask)
    got = engine.pop_summed()
    expected = reference_clipped_sum(model, ce, (x, y), mask, clip_norm=0.2, style=style, function="automatic")
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-7)


def test_fallback_never_accepts_batchnorm() -> None:
    """Reference: DESIGN.md section 6; BatchNorm mixes examples, a per-example gradient does not exist."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    with pytest.raises(UnsupportedLayerError, match="GroupNorm"):
        ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, functorch_fallback=True))


def _chain(width: int, depth: int = 8) -> nn.Module:
    return nn.Sequential(*[nn.Sequential(nn.Linear(width, width), nn.Tanh()) for _ in range(depth)])


def _peak_live_contributions(style: str) -> int:
    """Contributions held just before a group is clipped, at most, for blocks that never fit in what the forward's
    storages let go of: [2, 64, 64] per-example gradients (32 KB) against [2, 2, 64] activations (1 KB)."""
    torch.manual_seed(0)
    model = _chain(64)
    kwargs = {"clipping_groups": 4} if style == "group-wise" else {}
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clipping_style=style, **kwargs))
    engine.attach()
    peak = 0
    finalize = engine._finalize

    def spy(groups, last: bool = False, spill: bool = False) -> None:  # live contributions before a group is clipped
        nonlocal peak
        groups = list(groups)
        if groups:
            peak = max(peak, sum(len(v) for v in engine._contributions.values()))
        finalize(groups, last, spill)

    engine._finalize = spy  # type: ignore[method-assign]
    with engine.recording(CPU):
        loss = model(torch.randn(2, 2, 64)).sum((1, 2)).sum()
    engine.backward(loss, torch.ones(2, dtype=torch.bool))
    assert not engine._held_back
    return peak


def test_layer_and_group_wise_release_stored_tensors_early() -> None:
    """Reference: all-layer holds every layer's factors until the backward ends; layer-wise at most one layer's
    where the blocks do not fit in the memory the forward has let go of."""
    all_layer = _peak_live_contributions("all-layer")
    assert all_layer == 16  # 8 weights + 8 biases
    assert _peak_live_contributions("layer-wise") == 2  # one layer's weight and bias at a time
    assert _peak_live_contributions("group-wise") == 4  # one group of 2 layers


def _held_back_run(model: nn.Module, config: PrivacyConfig, x: Tensor, mask: Tensor, spill: bool, loss_fn) -> tuple:
    """The engine's clipped sums on (x, mask), the groups it held back and those it spilled (``spill``: an output
    gradient forced not to fit at the fifth tap); checks at each hold-back that what is held fits in what the
    forward's storages let go of."""
    engine = ClippingEngine(model, config)
    engine.attach()
    held_back, spilled, taps = [], [], 0
    hold_back, spill_at = engine._hold_back, engine._spill

    def hold_spy(groups: set[int]) -> set[int]:
        out = hold_back(groups)
        held_back.extend(out)
        assert engine._held_back_bytes <= engine._forward_end_bytes - engine._forward_live()  # the invariant
        return out

    def spill_spy(incoming: int) -> None:
        nonlocal taps
        taps += 1
        before = set(engine._held_back)
        spill_at(10**12 if spill and taps == 5 else incoming)
        if before and not engine._held_back:
            spilled.append(before)

    engine._hold_back, engine._spill = hold_spy, spill_spy  # type: ignore[method-assign]
    try:
        with engine.recording(CPU):
            loss = loss_fn(model, (x,)).sum()
        engine.backward(loss, mask)
    finally:
        engine.detach()
    return engine.pop_summed(), held_back, spilled


@pytest.mark.parametrize("style", ["layer-wise", "param-wise", "group-wise"])
@pytest.mark.parametrize("spill", [False, True], ids=["held-to-the-end", "spilled"])
def test_groups_held_back_fit_in_what_the_forward_let_go_of(style, spill) -> None:
    """Reference: reference_clipped_sum. With [4, 256, 4] activations (16 KB each) and [4, 4, 4] blocks, groups
    complete in the backward are held back and clipped after it in one pass, only while their blocks fit in the
    bytes the forward's storages held at its end and have let go of since. ``spill``: an output gradient that no
    longer fits beside them (forced at the fifth tap) clips them there. Either way, the clipped sums are the
    reference's; and sensitivity: removing one example (made 1000x larger than the others) moves them by <= C."""
    torch.manual_seed(3)
    model = _chain(4)
    x = torch.randn(4, 256, 4)
    mask = torch.tensor([True, True, False, True])

    def loss_fn(m: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
        return m(inputs[0]).square().mean((1, 2))

    groups = 4 if style == "group-wise" else None
    expected = reference_clipped_sum(
        model, loss_fn, (x,), mask, clip_norm=0.1, style=style, function="abadi", groups=groups
    )
    kwargs = {"clipping_groups": groups} if groups else {}
    config = PrivacyConfig(
        noise_multiplier=1.0, clip_norm=0.1, clipping_style=style, clipping_function="abadi", **kwargs
    )
    summed, held_back, spilled = _held_back_run(model, config, x, mask, spill, loss_fn)
    for name, value in expected.items():
        torch.testing.assert_close(summed[name].double(), value, rtol=1e-5, atol=1e-6)
    assert len(held_back) >= 2
    assert bool(spilled) == spill

    x[0] *= 1000.0
    everything, held_back, _ = _held_back_run(model, config, x, mask, spill, loss_fn)
    without, _, _ = _held_back_run(model, config, x[1:], mask[1:], spill, loss_fn)
    assert len(held_back) >= 2
    moved = torch.cat([(everything[name] - without[name]).double().flatten() for name in everything]).norm()
    assert moved.item() <= 0.1 * (1 + 1e-5)


@pytest.mark.parametrize("style", ["layer-wise", "param-wise"])
def test_groups_holding_only_per_example_gradients_are_clipped_together_after_the_backward(style) -> None:
    """Reference: reference_clipped_sum. Norm layers and biases hold only [n, P] per-example gradients: their groups
    are clipped in one pass after the backward; groups with factors (the weights) as soon as they complete."""
    torch.manual_seed(5)
    model = nn.Sequential(
        nn.Linear(6, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2)
    )
    x, y = torch.randn(6, 5, 6), torch.randn(6, 5, 2)
    mask = torch.tensor([True, True, False, True, True, True])

    def loss_fn(m: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
        return 0.5 * (m(inputs[0]) - inputs[1]).square().sum((1, 2))

    expected = reference_clipped_sum(model, loss_fn, (x, y), mask, clip_norm=0.5, style=style, function="abadi")
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.5, clipping_style=style,
                                                 clipping_function="abadi"))  # fmt: skip
    engine.attach()
    clipped: dict[str, bool] = {}  # parameter -> clipped after the backward
    finalize = engine._finalize

    def spy(groups, last: bool = False, spill: bool = False) -> None:
        before = {key[0] for key in engine._contributions}
        finalize(groups, last, spill)
        clipped.update(dict.fromkeys(before - {key[0] for key in engine._contributions}, last))

    engine._finalize = spy  # type: ignore[method-assign]
    engine._hold_back = lambda groups: set()  # type: ignore[method-assign]  # (weights that fit: the test above)
    with engine.recording(CPU):
        loss = loss_fn(model, (x, y)).sum()
    engine.backward(loss, mask)
    for name, value in expected.items():
        torch.testing.assert_close(engine.summed[name].double(), value, rtol=1e-5, atol=1e-6)
    light = {name for name in clipped if name.startswith(("1.", "4.")) or name.endswith("bias")}
    if style == "layer-wise":  # a Linear's bias is clipped with its weight
        light = {name for name in light if name.startswith(("1.", "4."))}
    assert {name for name, last in clipped.items() if last} == light


def test_registered_clipping_function_is_used_and_checked() -> None:
    """Reference: a registered 'global' function, 1[n <= C] (Bu et al. 2106.07836), against the float64 loop."""
    from lightning_dpzero.clipping import register_clipping_function

    with pytest.raises(ValueError, match="exceed C"):
        register_clipping_function("unsafe", lambda norms, c, gamma: torch.ones_like(norms))
    register_clipping_function("global-test", lambda norms, c, gamma: (norms <= c).float())
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(5, 3))
    x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=1.0, clipping_function="global-test"))
    engine.attach()
    with engine.recording(CPU):
        loss = ce(model, (x, y)).sum()
    engine.backward(loss, torch.ones(8, dtype=torch.bool))
    got = engine.pop_summed()
    expected = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in model.named_parameters()}
    for i in range(8):
        model.zero_grad()
        ce(model, (x[i : i + 1], y[i : i + 1])).sum().backward()
        g = {n: p.grad.double() for n, p in model.named_parameters()}
        if torch.sqrt(sum(v.square().sum() for v in g.values())) <= 1.0:
            for n in expected:
                expected[n] += g[n]
    for n, value in expected.items():
        torch.testing.assert_close(got[n].double(), value, rtol=1e-5, atol=1e-7)
