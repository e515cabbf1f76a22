"""Per-example norms that cannot under-estimate (DESIGN.md section 7): sensitivity <= C (1 + 1e-5) on adversarial
inputs, for every clipping style, function, norm mode and compute dtype.

The harness (``sensitivity``) runs the clipping engine as a strategy does, once on a physical batch D and once on D
minus one example, with no noise, and measures ||S(D) - S(D')|| for the summed clipped gradient S. The removed
example is built to break Gram-matrix ("ghost") norms: two positions whose activations are huge and opposite while
their output gradients are almost equal, so that ||sum_t b_t a_t^T||^2 = sum_{s,t} <a_s, a_t><b_s, b_t> is a
difference of huge terms; or values near the ends of the dtype's range, whose squares underflow or overflow.
The losses are linear in the outputs (the loss weights are the output gradients b), so every case is exact."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from lightning_dpzero.clipping import ClippingEngine
from lightning_dpzero.config import ClippingFunction, ClippingStyle, NormMode, PrivacyConfig

CPU = torch.device("cpu")
C = 1.0
TOLERANCE = 1e-5
CANCELLATION = [1e-1, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7]  # relative size of what survives the cancellation
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def engine_sum(model: nn.Module, forward, inputs: tuple[Tensor, ...], **config) -> Tensor:
    """The summed clipped gradient of all trainable parameters, flattened (float64), sigma = 0."""
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=C, **config))
    engine.attach()
    try:
        with engine.recording(CPU):
            loss = forward(model, *inputs)
        engine.backward(loss, torch.ones(inputs[0].shape[0], dtype=torch.bool))
    finally:
        engine.detach()
    summed = engine.pop_summed()
    return torch.cat([summed[name].double().flatten() for name in engine.params])


def sensitivity(model: nn.Module, forward, inputs: tuple[Tensor, ...], **config) -> float:
    """||S(D) - S(D minus example 0)|| / C."""
    everything = engine_sum(model, forward, inputs, **config)
    without = engine_sum(model, forward, tuple(x[1:] for x in inputs), **config)
    return (everything - without).norm().item() / C


# ------------------------------------------------------------------------------------------------- the models
class Sequence(nn.Module):
    """Linear on [n, T, D] (ghost norms at T > 1), then a bias-only LayerNorm-free head: a second Linear."""

    def __init__(self, d: int = 12, p: int = 10) -> None:
        super().__init__()
        self.lin = nn.Linear(d, p)
        self.out = nn.Linear(p, 3)


def sequence_forward(model: Sequence, x: Tensor, weights: Tensor, head: Tensor) -> Tensor:
    """sum over positions of <weights_t, lin(x_t)> + <head, out(lin(x).mean)>: b_t = weights_t at ``lin``."""
    y = model.lin(x)  # [n, T, P]
    return (y * weights).sum() + (model.out(y.mean(1)) * head).sum()


class Conv(nn.Module):
    def __init__(self, kernel: int, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, kernel, padding=kernel // 2, groups=groups)


def conv_forward(model: Conv, x: Tensor, weights: Tensor) -> Tensor:
    return (model.conv(x) * weights).sum()


class Tied(nn.Module):
    """One matrix used twice: an Embedding lookup and a Linear head (as a GPT's tied wte / lm_head)."""

    def __init__(self, vocab: int = 9, d: int = 8) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight


def tied_forward(model: Tied, ids: Tensor, emb_weights: Tensor, z: Tensor, head_weights: Tensor) -> Tensor:
    return (model.emb(ids) * emb_weights).sum() + (model.head(z) * head_weights).sum()


def _cast(model: nn.Module, inputs: tuple[Tensor, ...], dtype: torch.dtype) -> tuple[nn.Module, tuple[Tensor, ...]]:
    return model.to(dtype), tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)


# ---------------------------------------------------------------------------------------- adversarial batches
def opposite_rows(eps: float, scale: float, g: torch.Generator) -> tuple[Tensor, ...]:
    """Example 0: positions 0 and 1 hold x and -x (1 + eps noise), times ``scale``; their output gradients are w
    and w + eps; ordinary examples 1..3 after it."""
    n, t, d, p = 4, 5, 12, 10
    x = torch.randn(n, t, d, generator=g)
    w = torch.randn(n, t, p, generator=g) * 0.1
    x[0, 1] = -x[0, 0] * (1 + eps * torch.randn(d, generator=g))
    w[0, 1] = w[0, 0] + eps * torch.randn(p, generator=g)
    x[0, :2] *= scale
    w[0, :2] /= scale
    return x, w, torch.randn(n, 3, generator=g)


def opposite_pixels(eps: float, scale: float, g: torch.Generator) -> tuple[Tensor, ...]:
    n = 3
    x = torch.randn(n, 4, 5, 5, generator=g)
    w = torch.randn(n, 6, 5, 5, generator=g) * 0.1
    x[0, :, 0, 0], x[0, :, 4, 4] = x[0, :, 0, 0] * scale, -x[0, :, 0, 0] * scale * (1 + eps)
    w[0, :, 0, 0] /= scale
    w[0, :, 4, 4] = w[0, :, 0, 0] + eps / scale
    return x, w


def opposite_uses(eps: float, scale: float, g: torch.Generator) -> tuple[Tensor, ...]:
    """Example 0's embedding gradient (token 3 at two positions, opposite gradients) and its head gradient (row 3
    of the tied matrix, from z = minus the embedding's output gradients) cancel to eps."""
    n, t, d, v = 3, 4, 8, 9
    ids = torch.randint(0, v, (n, t), generator=g)
    emb_w = torch.randn(n, t, d, generator=g) * 0.1
    z = torch.randn(n, t, d, generator=g)
    head_w = torch.randn(n, t, v, generator=g) * 0.1
    ids[0] = 3
    emb_w[0, 0] = torch.randn(d, generator=g) * scale
    emb_w[0, 1] = -emb_w[0, 0] * (1 + eps)
    head_w[0] = 0.0
    head_w[0, :, 3] = 1.0
    z[0] = -emb_w[0] + eps * torch.randn(t, d, generator=g)
    return ids, emb_w, z, head_w


CASES = {
    "sequence": (lambda: Sequence(), sequence_forward, opposite_rows),
    "conv1x1": (lambda: Conv(1), conv_forward, opposite_pixels),
    "conv3x3": (lambda: Conv(3), conv_forward, opposite_pixels),
    "conv1x1 groups=2": (lambda: Conv(1, groups=2), conv_forward, opposite_pixels),  # row blocks of one weight
    "tied": (lambda: Tied(), tied_forward, opposite_uses),
}


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("norm_mode", list(NormMode))
@pytest.mark.parametrize("function", list(ClippingFunction))
@pytest.mark.parametrize("style", list(ClippingStyle))
def test_adversarial_examples_move_the_clipped_sum_by_at_most_c(style, function, norm_mode, dtype) -> None:
    """Reference: the DP bound ||S(D) - S(D')|| <= C, to (1 + 1e-5), over cancellations from 1e-1 to 1e-7 of five
    models (sequence Linear, 1x1 and 3x3 Conv, a grouped 1x1 Conv, an Embedding tied to a Linear head), at ordinary
    scale and at the ends of the dtype's range."""
    groups = 2 if style is ClippingStyle.GROUP_WISE else None
    config = dict(clipping_style=style, clipping_function=function, norm_mode=norm_mode, clipping_groups=groups)
    finfo = torch.finfo(DTYPES[dtype])
    scales = [1.0, math.sqrt(finfo.max) / 64, 64 * math.sqrt(finfo.tiny)]  # products stay representable
    worst = 0.0
    for name, (build, forward, adversarial) in CASES.items():
        for eps in CANCELLATION:
            for scale in scales:
                g = torch.Generator().manual_seed(hash((name, eps, scale)) % 2**31)
                torch.manual_seed(0)
                model, inputs = _cast(build(), adversarial(eps, scale, g), DTYPES[dtype])
                s = sensitivity(model, forward, inputs, **config)
                assert math.isfinite(s), (name, eps, scale)
                worst = max(worst, s)
                assert s <= 1 + TOLERANCE, f"{name}: eps={eps}, scale={scale:.3g}: sensitivity {s:.6g} C"
    print(f"worst sensitivity {worst:.8f} C")


def test_the_exact_path_is_taken_only_where_cancellation_is_possible() -> None:
    """Reference: tests/reference.py (float64, each example alone). Ordinary data (Gaussian activations and
    gradients) needs no exact recomputation; the adversarial example (a dominant pair of opposite rows, cancellation
    1e-6) does, and its clipped gradient then equals the float64 reference's, where the fp32 Gram norm was off by
    orders of magnitude."""
    from tests.reference import reference_clipped_sum

    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = Sequence()
    x, w, head = opposite_rows(1e-6, 1.0, g)
    x[0, :2] *= 1e3  # the opposite pair dominates example 0's Gram sums
    w[0, :2] *= 1e3
    head[0] = 0.0  # only the adversarial layer carries example 0's gradient
    config = dict(noise_multiplier=1.0, clip_norm=C, norm_mode="ghost", clipping_function="abadi")

    def run(rows: slice) -> tuple[dict[str, Tensor], int]:
        engine = ClippingEngine(model, PrivacyConfig(**config))
        engine.attach()
        with engine.recording(CPU):
            loss = sequence_forward(model, x[rows], w[rows], head[rows])
        engine.backward(loss, torch.ones(x[rows].shape[0], dtype=torch.bool))
        engine.detach()
        return engine.pop_summed(), engine.exact_recomputations

    assert run(slice(1, None))[1] == 0
    summed, recomputed = run(slice(0, 1))
    assert recomputed >= 1
    expected = reference_clipped_sum(
        model,
        lambda m, inputs: sequence_forward(m, *inputs).reshape(1),
        (x[:1], w[:1], head[:1]),
        torch.ones(1, dtype=torch.bool),
        clip_norm=C,
        style="all-layer",
        function="abadi",
    )
    for name, value in expected.items():
        torch.testing.assert_close(summed[name].double(), value, rtol=1e-5, atol=1e-7, msg=name)


class ConvNorms(nn.Module):
    """A 3x3 convolution, GroupNorm and LayerNorm (normalising with the statistics their forward saved), a head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 6, 3, padding=1)
        self.group = nn.GroupNorm(2, 6)
        self.layer = nn.LayerNorm(6)
        self.head = nn.Linear(6, 3)


def conv_norms_forward(model: ConvNorms, x: Tensor, conv_weights: Tensor, head_weights: Tensor) -> Tensor:
    y = model.conv(x)  # [n, 6, 5, 5]
    h = model.layer(torch.tanh(model.group(y)).flatten(2).transpose(1, 2))  # [n, 25, 6]
    return (y * conv_weights).sum() + (model.head(h) * head_weights).sum()


@pytest.mark.parametrize("way", ["grouped convolution", "patches", "kernel-major windows"])
@pytest.mark.parametrize("function", list(ClippingFunction))
@pytest.mark.parametrize("style", list(ClippingStyle))
def test_convolution_and_norm_layers_move_the_clipped_sum_by_at_most_c(monkeypatch, style, function, way) -> None:
    """Reference: the DP bound ||S(D) - S(D')|| <= C, to (1 + 1e-5), for a convolution's per-example gradients formed
    any of three ways (conv._grouped_is_faster, conv._kernel_major_is_faster forced), with GroupNorm and LayerNorm
    rules on their forward's statistics and several clipping groups clipped at once (param- and group-wise), on
    opposite pixels at ordinary and extreme scales."""
    import lightning_dpzero.clipping.rules.conv as conv_rules

    monkeypatch.setattr(conv_rules, "_grouped_is_faster", lambda positions, per_group: way == "grouped convolution")
    monkeypatch.setattr(conv_rules, "_kernel_major_is_faster", lambda per_group: way == "kernel-major windows")
    groups = 2 if style is ClippingStyle.GROUP_WISE else None
    config = dict(clipping_style=style, clipping_function=function, clipping_groups=groups)
    for eps in (1e-1, 1e-4, 1e-7):
        for scale in (1.0, 1e6, 1e-6):
            g = torch.Generator().manual_seed(hash((eps, scale)) % 2**31)
            torch.manual_seed(0)
            x, conv_weights = opposite_pixels(eps, scale, g)
            head_weights = torch.randn(x.shape[0], 25, 3, generator=g)
            s = sensitivity(ConvNorms(), conv_norms_forward, (x, conv_weights, head_weights), **config)
            assert math.isfinite(s) and s <= 1 + TOLERANCE, f"eps={eps}, scale={scale:g}: sensitivity {s:.6g} C"
