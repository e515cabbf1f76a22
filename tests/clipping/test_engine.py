"""ClippingEngine against the float64 per-example oracle (tests/reference.py), for every registered layer type,
clipping style, clipping function and norm mode; padding, sharing, accumulation and refusals."""

from __future__ import annotations

import gc
import math
import weakref

import pytest
import torch
from torch import Tensor, nn

import lightning_dpzero.clipping.contributions as contributions_module
import lightning_dpzero.clipping.engine as engine_module
import lightning_dpzero.clipping.rules.conv as conv_rules
from lightning_dpzero.clipping import ClippingEngine, UnsupportedLayerError
from lightning_dpzero.config import ClippingFunction, ClippingStyle, NormMode, PrivacyConfig
from tests.conftest import (
    CONV_CASES,
    N_EXAMPLES,
    SHARING_CASES,
    Built,
    LayerCase,
    conv2d_strided_reflect_grouped,
    default_mask,
    embedding_padding_idx,
    group_norm_conv,
    layer_case_params,
    linear_3d,
    squared_error,
    tied_gpt,
    twice_linear,
)
from tests.reference import (
    reference_clipped_sum,
    reference_factors,
    reference_group_norms,
    reference_groups,
    reference_per_sample_grads,
    trainable_names,
)

CPU = torch.device("cpu")
GROUP_COUNT = 2  # clipping_groups for group-wise in the parametrised tests
RTOL = 1e-5


def _groups_for(style: ClippingStyle) -> int | None:
    return GROUP_COUNT if style is ClippingStyle.GROUP_WISE else None


def run_engine(model: nn.Module, loss_fn, batches: list[tuple[tuple[Tensor, ...], Tensor]], **config) -> tuple:
    """The engine exactly as a strategy drives it: one recording + backward per physical batch, then pop."""
    eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, **config))
    eng.attach()
    for inputs, mask in batches:
        with eng.recording(CPU):
            loss = loss_fn(model, inputs).sum()
        eng.backward(loss, mask)
    return eng.pop_summed(), eng


def split_clip_norm(model, loss_fn, inputs, mask, style, groups=None) -> float:
    """C such that C_k = C / sqrt(K) lies strictly inside the spread of the real examples' group norms.

    Then abadi clips some (example, group) pairs and leaves others unclipped.
    """
    grads = reference_per_sample_grads(model, loss_fn, inputs, mask)
    labels, group_of = reference_groups(model, style, groups)
    values = (reference_group_norms(grads, group_of, len(labels)) * math.sqrt(len(labels))).flatten().sort().values
    m = len(values) // 2
    return float(torch.sqrt(values[m - 1] * values[m]))


def assert_matches(got: dict[str, Tensor], expected: dict[str, Tensor], clip_norm: float) -> None:
    """rtol 1e-5; atol from fp32 rounding of terms of size ~C (a clipped gradient has norm <= C)."""
    assert set(got) == set(expected), f"parameters: got {sorted(got)}, expected {sorted(expected)}"
    for name, exp in expected.items():
        assert got[name].dtype == torch.float32, name
        torch.testing.assert_close(
            got[name].double(), exp, rtol=RTOL, atol=1e-6 * clip_norm, msg=lambda m, n=name: f"{n}: {m}"
        )


def _replace_masked_rows(inputs: tuple[Tensor, ...], mask: Tensor, seed: int) -> tuple[Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        x = x.clone()
        pad = ~mask
        if x.is_floating_point():
            x[pad] = 5.0 * torch.randn(x[pad].shape, generator=gen)
        else:
            x[pad] = torch.randint(int(x.min()), int(x.max()) + 1, x[pad].shape, generator=gen)
        out.append(x)
    return tuple(out)


# ---------------------------------------------------------------------------------------------- every layer
@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
@pytest.mark.parametrize("function", list(ClippingFunction), ids=str)
@pytest.mark.parametrize("style", list(ClippingStyle), ids=str)
@pytest.mark.parametrize("case", layer_case_params())
def test_clipped_sum_matches_reference(case: LayerCase, style, function, norm_mode):
    """Reference: tests/reference.py reference_clipped_sum (float64 per-example autograd; DESIGN.md section 4)."""
    model, loss_fn, inputs = case()
    mask = default_mask()
    groups = _groups_for(style)
    clip_norm = split_clip_norm(model, loss_fn, inputs, mask, style, groups)
    kwargs = dict(clip_norm=clip_norm, style=style, function=function, groups=groups)
    if function is ClippingFunction.ABADI:
        factors = reference_factors(model, loss_fn, inputs, mask, **kwargs)
        assert (factors < 1).any() and (factors == 1).any(), "the setting must clip some examples and not others"
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, **kwargs)

    got, _ = run_engine(
        model,
        loss_fn,
        [(inputs, mask)],
        clip_norm=clip_norm,
        clipping_style=style,
        clipping_function=function,
        norm_mode=norm_mode,
        clipping_groups=groups,
    )
    assert_matches(got, expected, clip_norm)


@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
@pytest.mark.parametrize("case", layer_case_params())
def test_padded_rows_contribute_exactly_zero(case: LayerCase, norm_mode):
    """Reference: DESIGN.md section 2.3 (padded rows contribute exactly zero): bit-for-bit equal sums."""
    model, loss_fn, inputs = case()
    mask = default_mask()
    config = dict(clip_norm=0.5, clipping_style=ClippingStyle.LAYER_WISE, clipping_function=ClippingFunction.ABADI)
    first, _ = run_engine(model, loss_fn, [(inputs, mask)], norm_mode=norm_mode, **config)
    second, _ = run_engine(
        model, loss_fn, [(_replace_masked_rows(inputs, mask, 1), mask)], norm_mode=norm_mode, **config
    )
    assert set(first) == set(second)
    for name in first:
        assert torch.equal(first[name], second[name]), f"{name}: a padded row changed the clipped sum"


@pytest.mark.parametrize("case", layer_case_params())
def test_all_masked_batch_gives_zeros(case: LayerCase):
    """Reference: DESIGN.md section 2.2 (an empty Poisson sample is a valid step: one fully masked batch sums to 0)."""
    model, loss_fn, inputs = case()
    mask = torch.zeros(N_EXAMPLES, dtype=torch.bool)
    got, _ = run_engine(model, loss_fn, [(inputs, mask)], clip_norm=1.0)
    assert set(got) == set(trainable_names(model))
    for name, value in got.items():
        assert torch.count_nonzero(value) == 0, name


def test_float_mask_is_accepted():
    """Reference: ClippingEngine.backward docstring (mask: 1 for real examples, 0 for padding) and reference.py."""
    model, loss_fn, inputs = SHARING_CASES["twice_linear_seq"]()
    mask = default_mask()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=0.3, style="all-layer", function="abadi")
    got, _ = run_engine(model, loss_fn, [(inputs, mask.float())], clip_norm=0.3, clipping_function="abadi")
    assert_matches(got, expected, 0.3)


# ---------------------------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
@pytest.mark.parametrize("function", list(ClippingFunction), ids=str)
@pytest.mark.parametrize("style", list(ClippingStyle), ids=str)
def test_shared_parameters_match_reference(sharing_case: Built, style, function, norm_mode):
    """Reference: reference_clipped_sum; tied weights and repeated calls need the cross terms of the norm."""
    model, loss_fn, inputs = sharing_case
    mask = default_mask()
    groups = _groups_for(style)
    clip_norm = split_clip_norm(model, loss_fn, inputs, mask, style, groups)
    expected = reference_clipped_sum(
        model, loss_fn, inputs, mask, clip_norm=clip_norm, style=style, function=function, groups=groups
    )
    got, _ = run_engine(
        model,
        loss_fn,
        [(inputs, mask)],
        clip_norm=clip_norm,
        clipping_style=style,
        clipping_function=function,
        norm_mode=norm_mode,
        clipping_groups=groups,
    )
    assert_matches(got, expected, clip_norm)


def test_tied_weight_appears_once_under_its_canonical_name():
    """Reference: model.named_parameters() (a tied parameter is listed once, under its first name)."""
    model, loss_fn, inputs = SHARING_CASES["tied_gpt"]()
    got, eng = run_engine(model, loss_fn, [(inputs, default_mask())], clip_norm=1.0)
    assert set(got) == set(trainable_names(model))
    assert "wte.weight" in got and "lm_head.weight" not in got


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_a_tied_head_and_embedding_are_one_block_and_one_outlier_moves_their_sum_by_at_most_c(monkeypatch, style):
    """The tied head's instantiated block takes the embedding's rows (contributions.merge): one block, whose norm is
    that of the summed gradient, no cross term. Reference: reference_clipped_sum; and the DP bound: an outlier
    (its loss x 1000) removed moves the clipped sum by at most C."""
    merged = []
    merge = engine_module.merge
    monkeypatch.setattr(engine_module, "merge", lambda a, b: merged.append(merge(a, b)) or merged[-1])
    model, loss_fn, inputs = SHARING_CASES["tied_gpt"]()
    mask, clip_norm = default_mask(), 0.5
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=clip_norm, style=style, function="abadi")
    got, _ = run_engine(model, loss_fn, [(inputs, mask)], clip_norm=clip_norm, clipping_style=style,
                        clipping_function="abadi")  # fmt: skip
    assert_matches(got, expected, clip_norm)
    assert [m.param for m in merged if m is not None] == ["wte.weight"]
    weights = torch.ones(N_EXAMPLES)
    weights[0] = 1000.0
    sums = []
    for keep in (torch.ones(N_EXAMPLES, dtype=torch.bool), torch.arange(N_EXAMPLES) > 0):
        got, _ = run_engine(model, lambda m, x: loss_fn(m, x) * weights, [(inputs, keep)], clip_norm=clip_norm,
                            clipping_style=style, clipping_function="abadi")  # fmt: skip
        sums.append(torch.cat([got[name].double().flatten() for name in sorted(got)]))
    assert (sums[0] - sums[1]).norm() <= clip_norm * (1 + 1e-5)


class _Positions(nn.Module):
    """Token and position embeddings; the positions' ids are given as a batch of one (expanded to the examples by the
    engine) or per example, all alike."""

    def __init__(self, positions: list[int], expanded: bool, padding_idx: int | None) -> None:
        super().__init__()
        self.tokens = nn.Embedding(7, 4)
        self.positions = nn.Embedding(6, 4, padding_idx=padding_idx)
        self.ids = torch.tensor([positions])
        self.expanded = expanded
        self.head = nn.Linear(4, 2)

    def forward(self, x: Tensor) -> Tensor:
        ids = self.ids if self.expanded else self.ids.repeat(x.shape[0], 1)
        return self.head(torch.tanh(self.tokens(x) + self.positions(ids)))


@pytest.mark.parametrize("expanded", [True, False], ids=["a batch of one", "per example"])
@pytest.mark.parametrize(
    ("positions", "padding_idx"),
    [([0, 1, 2, 3], None), ([3, 1, 1, 0], None), ([0, 1, 2, 3], 2)],
    ids=["distinct", "repeated", "with padding"],
)
def test_ids_every_example_shares_match_reference(positions, padding_idx, expanded):
    """Reference: reference_clipped_sum. Ids that every example shares (positions) take their own ways: where they
    are distinct and none is padding, an example's squared norm is its output gradient's; their clipped sum is one
    matrix-vector product and a scatter of one row of ids. A repeated id (two positions in one row of G_i) or a
    padding id must not take the first. And the DP bound: an outlier (its loss x 1000) removed moves the clipped sum
    by at most C."""
    torch.manual_seed(49)
    model = _Positions(positions, expanded, padding_idx)
    inputs = (torch.randint(0, 7, (N_EXAMPLES, 4)), torch.randn(N_EXAMPLES, 4, 2))

    def clipped(style: str, mask: Tensor, weights: Tensor) -> dict[str, Tensor]:
        eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.2, clipping_style=style,
                                                  clipping_function="abadi"))  # fmt: skip
        eng.attach()
        with eng.recording(CPU, rows=N_EXAMPLES):  # as the strategies record: the batch of one is expanded
            loss = (squared_error(model, inputs) * weights).sum()
        eng.backward(loss, mask)
        eng.detach()
        return eng.pop_summed()

    for style in ("all-layer", "param-wise"):
        mask = default_mask()
        expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.2, style=style,
                                         function="abadi")  # fmt: skip
        assert_matches(clipped(style, mask, torch.ones(N_EXAMPLES)), expected, 0.2)
    weights = torch.ones(N_EXAMPLES)
    weights[0] = 1000.0
    sums = []
    for keep in (torch.ones(N_EXAMPLES, dtype=torch.bool), torch.arange(N_EXAMPLES) > 0):
        got = clipped("all-layer", keep, weights)
        sums.append(torch.cat([got[name].double().flatten() for name in sorted(got)]))
    assert (sums[0] - sums[1]).norm() <= 0.2 * (1 + 1e-5)


@pytest.mark.parametrize(
    ("style", "groups", "norm_fractions"),
    [
        ("layer-wise", None, (0.2, 0.3, 0.5, math.sqrt(1 - 0.04 - 0.09 - 0.25))),
        ("param-wise", None, (0.1, 0.2, 0.3, 0.4, math.sqrt(1 - 0.01 - 0.04 - 0.09 - 0.16))),
        ("group-wise", 2, (0.6, 0.8)),
        ("group-wise", ("wte", "ln"), (0.3, 0.5, math.sqrt(1 - 0.09 - 0.25))),  # prefixes in model order
        ("group-wise", ("ln", "wte"), (0.1, 0.6, math.sqrt(1 - 0.01 - 0.36))),  # thresholds follow prefix order
        ("group-wise", ("ln", "mlp"), (0.1, 0.3, math.sqrt(1 - 0.01 - 0.09))),  # unmatched wte: the last group
    ],
)
def test_explicit_group_clip_norms_match_reference(style, groups, norm_fractions):
    """Reference: reference_clipped_sum with group_clip_norms (C_k in group order; prefixes as given, rest last)."""
    model, loss_fn, inputs = SHARING_CASES["tied_gpt"]()  # wte, ln, mlp: 3 modules, 5 parameters
    mask = default_mask()
    clip_norm = 0.7
    norms = tuple(clip_norm * f for f in norm_fractions[: len(reference_groups(model, style, groups)[0])])
    norms = norms[:-1] + (math.sqrt(clip_norm**2 - sum(c * c for c in norms[:-1])),)
    kwargs = dict(clip_norm=clip_norm, style=style, function="abadi", groups=groups, group_clip_norms=norms)
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, **kwargs)
    got, eng = run_engine(
        model,
        loss_fn,
        [(inputs, mask)],
        clip_norm=clip_norm,
        clipping_style=style,
        clipping_function="abadi",
        clipping_groups=groups,
        group_clip_norms=norms,
    )
    assert_matches(got, expected, clip_norm)


class _ManyVectors(nn.Module):
    """Biases and norm layers, whose per-example gradients are vectors (several per clipping group), a LayerNorm
    called twice (its two per-example vectors summed into one), and two weight matrices."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 6)
        self.ln1 = nn.LayerNorm(6)
        self.lin2 = nn.Linear(6, 5)
        self.ln2 = nn.LayerNorm(5)
        self.head = nn.Linear(5, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.ln1(torch.tanh(self.lin1(x)))
        h = torch.tanh(self.lin2(h))
        return self.head(self.ln2(h) + self.ln2(h * h))


@pytest.mark.parametrize("at_once", [1, 7, None], ids=["one block at a time", "a few at a time", "all at once"])
@pytest.mark.parametrize(
    ("style", "groups"), [("all-layer", None), ("group-wise", 3), ("param-wise", None)], ids=lambda v: str(v)
)
def test_vector_blocks_taken_side_by_side_match_reference(monkeypatch, style, groups, at_once):
    """Reference: reference_clipped_sum over two physical batches, with a threshold per group. The engine takes the
    norms and clipped sums of blocks held as per-example vectors side by side (contributions.VectorBlocks), a few
    elements per example at a time (engine._VECTOR_ELEMENTS_PER_ROW: one block, groups split across batches, all):
    each block's columns and each group's factors must stay its own."""
    if at_once is not None:
        monkeypatch.setattr(engine_module, "_VECTOR_ELEMENTS_PER_ROW", at_once)
    torch.manual_seed(8)
    model = _ManyVectors()
    inputs, mask = (torch.randn(N_EXAMPLES, 4) * 3, torch.randn(N_EXAMPLES, 2)), default_mask()
    k = len(reference_groups(model, style, groups)[0])
    weights = [j + 1.0 for j in range(k)]  # C_k^2 proportional to k + 1, summing to C^2
    norms = tuple(0.5 * math.sqrt(w / sum(weights)) for w in weights) if k > 1 else None
    kwargs = dict(clip_norm=0.5, style=style, function="abadi", groups=groups, group_clip_norms=norms)
    expected = reference_clipped_sum(model, squared_error, inputs, mask, **kwargs)
    first = tuple(x[:3] for x in inputs), mask[:3]
    second = tuple(x[3:] for x in inputs), mask[3:]
    got, _ = run_engine(model, squared_error, [first, second], clip_norm=0.5, clipping_style=style,
                        clipping_function="abadi", clipping_groups=groups, group_clip_norms=norms)  # fmt: skip
    assert_matches(got, expected, 0.5)


class _CalledTwiceOnceUnused(nn.Module):
    """Each Linear is called a second time on an output the loss does not use: its tap never reports, so both
    parameter groups are clipped together after the backward, in the order their blocks arrived (lin2 first)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin1 = nn.Linear(4, 3, bias=False)
        self.lin2 = nn.Linear(3, 2, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        self.lin1(x)
        h = torch.tanh(self.lin1(x))
        self.lin2(h)
        return self.lin2(h)


def test_groups_clipped_together_out_of_order_keep_their_own_norms():
    """Reference: reference_clipped_sum, param-wise with a threshold per parameter (C_1 != C_2)."""
    torch.manual_seed(5)
    model = _CalledTwiceOnceUnused()
    inputs, mask = (torch.randn(N_EXAMPLES, 4), torch.randn(N_EXAMPLES, 2)), default_mask()
    norms = (0.3, 0.4)
    kwargs = dict(clip_norm=0.5, style="param-wise", function="abadi", groups=None, group_clip_norms=norms)
    expected = reference_clipped_sum(model, squared_error, inputs, mask, **kwargs)
    got, _ = run_engine(model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_style="param-wise",
                        clipping_function="abadi", group_clip_norms=norms)  # fmt: skip
    assert_matches(got, expected, 0.5)


# ---------------------------------------------------------------------------------------------- accumulation
@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
@pytest.mark.parametrize(
    "build",
    [tied_gpt, twice_linear, conv2d_strided_reflect_grouped, embedding_padding_idx, group_norm_conv, linear_3d],
    ids=lambda b: b.__name__,
)
def test_two_physical_batches_sum_to_the_union(build, norm_mode):
    """Reference: reference_clipped_sum over the union of both physical batches (DESIGN.md section 2.4)."""
    model, loss_fn, inputs = build()
    mask = default_mask()
    first = tuple(x[:3] for x in inputs), mask[:3]
    second = tuple(x[3:] for x in inputs), mask[3:]
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=0.5, style="param-wise", function="abadi")
    got, _ = run_engine(
        model,
        loss_fn,
        [first, second],
        clip_norm=0.5,
        clipping_style="param-wise",
        clipping_function="abadi",
        norm_mode=norm_mode,
    )
    assert_matches(got, expected, 0.5)


class TwiceConv(nn.Module):
    """One Conv2d called twice (reflect padding, stride 2 then 1), then a head: cross terms between two uses of a
    convolution, whose patches the engine drops after each use's norm (Contribution.spare) and rebuilds for them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1, padding_mode="reflect")
        self.head = nn.Linear(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.conv(torch.tanh(self.conv(x))).mean((2, 3)))


# how a convolution's per-example gradients are instantiated
CONV_WAYS = [
    "grouped convolution",
    "patches",
    "grouped convolution, 2 examples at a time",
    "kernel-major windows",
    "kernel-major windows, 2 examples at a time",
]


def _instantiate_convolutions_by(monkeypatch, way: str) -> None:
    monkeypatch.setattr(conv_rules, "_grouped_is_faster", lambda positions, per_group: way.startswith("grouped"))
    monkeypatch.setattr(conv_rules, "_kernel_major_is_faster", lambda per_group: way.startswith("kernel-major"))
    if way == CONV_WAYS[2]:
        monkeypatch.setattr(conv_rules, "_grouped_rows_at_once", lambda activation, elements: 2)
    if way == CONV_WAYS[4]:
        monkeypatch.setattr(conv_rules, "_WINDOW_ELEMENTS", 1)  # one example's windows at a time


def _matches_abadi_all_layer(model: nn.Module, loss_fn, inputs: tuple[Tensor, ...], clip_norm: float, norm_mode):
    """One physical batch through the engine (all-layer, Abadi's clipping) against reference_clipped_sum; returns
    the engine."""
    mask = default_mask()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=clip_norm, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, eng = run_engine(model, loss_fn, [(inputs, mask)], clip_norm=clip_norm, clipping_function="abadi",
                          norm_mode=norm_mode)  # fmt: skip
    assert_matches(got, expected, clip_norm)
    return eng


@pytest.mark.parametrize("way", CONV_WAYS)
@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
def test_a_convolution_called_twice(monkeypatch, norm_mode, way):
    """Reference: reference_clipped_sum; all-layer, so both uses' contributions are held until the step's clipping.
    The two uses' per-example gradients meet in cross terms however each was formed (instantiated by the grouped
    convolution, in the weight's order, or from the patches, or factored as patches, in the patches' order)."""
    _instantiate_convolutions_by(monkeypatch, way)
    torch.manual_seed(40)
    inputs = (torch.randn(N_EXAMPLES, 3, 6, 6), torch.randn(N_EXAMPLES, 2))
    _matches_abadi_all_layer(TwiceConv(), squared_error, inputs, 0.5, norm_mode)


@pytest.mark.parametrize("way", CONV_WAYS)
@pytest.mark.parametrize("norm_mode", [NormMode.INSTANTIATE, NormMode.AUTO], ids=str)
@pytest.mark.parametrize("build", CONV_CASES, ids=lambda build: build.__name__)
def test_convolutions_match_reference_whichever_way_they_are_instantiated(monkeypatch, build, norm_mode, way):
    """Reference: reference_clipped_sum. Every convolution case (1-3 d, strides, dilation, groups, padding modes),
    its per-example gradients instantiated by the grouped weight-gradient convolution or from its patches (which
    ``conv._grouped_is_faster`` picks by the layer's shape; the test models are too small to reach both)."""
    _instantiate_convolutions_by(monkeypatch, way)
    eng = _matches_abadi_all_layer(*build(), 0.3, norm_mode)
    if norm_mode is NormMode.INSTANTIATE:
        assert eng.last_norm_modes["0"] == "instantiate"


class _WideThenDeferred(nn.Module):
    """Wide early layers, whose activations the backward gives back, then a convolution with few positions and many
    weights (P D > max(2 T^2, T (P + D)): under AUTO its norm mode is deferred), used again on every fourth position
    of its input (a T = 1 use: cross terms with the deferred one)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.wide = nn.Conv2d(3, 64, 3, padding=1)
        self.mix = nn.Conv2d(64, 32, 1)
        self.deep = nn.Conv2d(32, channels, 3, stride=4, padding=1)
        self.head = nn.Linear(channels, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.mix(torch.tanh(self.wide(x))))  # [n, 32, 16, 16]
        y = self.deep(h) + self.deep(h[..., ::4, ::4])  # T = 16 (deferred), T = 1
        return self.head(y.mean((2, 3)))


@pytest.mark.parametrize(
    ("style", "channels", "streamed", "expected_mode", "postponed"),
    [
        ("all-layer", 32, False, "instantiate", False),  # clipped after the backward: the block fits under the peak
        ("all-layer", 1024, False, "ghost", False),  # a block larger than anything the step has held
        ("layer-wise", 32, False, "instantiate", True),  # its group is clipped after the backward instead of during it
        ("layer-wise", 1024, False, "ghost", False),  # ... only where the block would fit then
        ("layer-wise", 32, True, "ghost", False),  # ... and not when the sums stream out in an order ranks share
    ],
)
def test_a_deferred_norm_is_instantiated_only_under_the_peak_of_memory_so_far(
    monkeypatch, style, channels, streamed, expected_mode, postponed
):
    """Reference: reference_clipped_sum (both ways exact, cross terms with the T = 1 use included); the mode follows
    what the step has already held (ClippingEngine._settle, _postponed), not a fixed shape rule. The patches are
    built at most 4 examples at a time (two chunks of the 6)."""
    monkeypatch.setattr(contributions_module, "_RIGHT_CHUNK", 4 * 16 * 32 * 9)
    left_to_the_end: list[int] = []
    postpone = ClippingEngine._postponed

    def spy(self: ClippingEngine, groups: set[int]) -> set[int]:
        out = postpone(self, groups)
        left_to_the_end.extend(out)
        return out

    monkeypatch.setattr(ClippingEngine, "_postponed", spy)
    torch.manual_seed(44)
    model = _WideThenDeferred(channels)
    inputs = (torch.randn(N_EXAMPLES, 3, 16, 16), torch.randn(N_EXAMPLES, 2))
    mask = default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style=style,
                                     function="abadi")  # fmt: skip
    eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.5, clipping_function="abadi",
                                              clipping_style=style))  # fmt: skip
    eng.attach()
    got: dict[str, Tensor] = {}
    if streamed:
        eng.sink = lambda name, block: got.__setitem__(name, got.get(name, 0) + (0 if block is None else block))
    for _ in range(2):
        with eng.recording(CPU):
            loss = squared_error(model, inputs).sum()
        eng.backward(loss, mask)
    got = got if streamed else eng.pop_summed()
    assert_matches(got, {name: 2 * value for name, value in expected.items()}, 0.5)
    assert eng.last_norm_modes["deep"] == expected_mode
    assert (eng.groups.group_of["deep.weight"] in left_to_the_end) == postponed


class _ConvStack(nn.Module):
    """The benchmark CNN's shape: convolutions 3-32-64-128 (strides 1, 2, 2) with GroupNorm, on 32x32 inputs."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, stride in ((3, 32, 1), (32, 64, 2), (64, 128, 2)):
            layers += [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(8, c_out), nn.ReLU()]
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(128, 2)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean((2, 3)))


def test_a_block_that_would_raise_the_peak_now_is_instantiated_after_the_backward(monkeypatch):
    """Reference: reference_clipped_sum. The second convolution's block passes the memory rule, but made when its
    output gradient arrives it would sit on the step's peak (that layer's own backward): it is deferred, approved, and
    instantiated after the backward all the same, never given the ghost norm. The third's is deferred by the rule."""
    settled: dict[int, tuple[bool, bool]] = {}
    settle = contributions_module.Contribution.settle

    def spy(self, instantiate, rows_at_once=None):
        settled[self.dims[2] if self.dims else -1] = (self.approved, instantiate)
        chunks[self.dims[2] if self.dims else -1] = rows_at_once
        return settle(self, instantiate, rows_at_once)

    chunks: dict[int, int | None] = {}

    monkeypatch.setattr(contributions_module.Contribution, "settle", spy)
    torch.manual_seed(45)
    model = _ConvStack()
    inputs, mask = (torch.randn(N_EXAMPLES, 3, 32, 32), torch.randn(N_EXAMPLES, 2)), default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, eng = run_engine(model, squared_error, [(inputs, mask)] * 2, clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, {name: 2 * value for name, value in expected.items()}, 0.5)
    assert {path: eng.last_norm_modes[path] for path in ("features.0", "features.3", "features.6")} == dict.fromkeys(
        ("features.0", "features.3", "features.6"), "instantiate"
    )
    assert settled[32 * 9] == (True, True)  # the second convolution (D = 32 x 3 x 3): approved, instantiated
    assert settled[64 * 9] == (False, True)  # the third: deferred by the memory rule, fits after the backward

    # Layer-wise, the approved block's group completes in the backward, where it would be made a few examples at a
    # time: it is clipped after the backward instead, with every example at once (ClippingEngine._postponed).
    postponed: set[int] = set()
    postpone = ClippingEngine._postponed
    monkeypatch.setattr(ClippingEngine, "_postponed", lambda self, groups: postponed.update(postpone(self, groups))
                        or postpone(self, groups))  # fmt: skip
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="layer-wise",
                                     function="abadi")  # fmt: skip
    got, eng = run_engine(model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_function="abadi",
                          clipping_style="layer-wise")  # fmt: skip
    assert_matches(got, expected, 0.5)
    assert eng.groups.group_of["features.3.weight"] in postponed
    assert settled[32 * 9] == (True, True) and chunks[32 * 9] >= N_EXAMPLES
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip

    # With no room left at all when they are settled, the approved block is still instantiated, by its grouped
    # convolution a few examples at a time (_FEWEST_ROWS); the other is not.
    settle_all = ClippingEngine._settle
    monkeypatch.setattr(engine_module, "_FEWEST_ROWS", 2)

    def no_room(self, deferred):
        self._peak_bound = 0
        return settle_all(self, deferred)

    monkeypatch.setattr(ClippingEngine, "_settle", no_room)
    got, eng = run_engine(model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, expected, 0.5)
    assert (eng.last_norm_modes["features.3"], eng.last_norm_modes["features.6"]) == ("instantiate", "ghost")
    assert chunks[32 * 9] == 2


def _held_from_scratch(engine: ClippingEngine) -> int:
    held: dict[int, int] = {}
    for contributions in engine._contributions.values():
        for c in contributions:
            for tensor in (c.left, c.right, c.instantiated):
                if tensor is not None and not engine._is_forward_storage(tensor.untyped_storage()):
                    held[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
    return sum(held.values())


def _forward_live_from_scratch(engine: ClippingEngine) -> int:
    return sum(size for ref, size in engine._forward_storage.values() if ref() is not None)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_the_memory_bound_is_kept_up_to_date_as_contributions_change(monkeypatch, style):
    """The bytes the engine holds and the forward's storages still alive are running totals (read at every tap: a
    scan of every contribution there made the step quadratic in depth, 20% of a 64-layer CNN's step). At every read
    they must equal a scan from scratch, through deferral, approval, merging, postponement and clipping."""
    reads = []
    live = ClippingEngine._live

    def checked(self: ClippingEngine) -> int:
        reads.append((self._held(), _held_from_scratch(self), self._forward_live(), _forward_live_from_scratch(self)))
        return live(self)

    monkeypatch.setattr(ClippingEngine, "_live", checked)
    torch.manual_seed(47)
    model = _ConvStack()
    inputs = (torch.randn(N_EXAMPLES, 3, 32, 32), torch.randn(N_EXAMPLES, 2))
    run_engine(model, squared_error, [(inputs, default_mask())] * 2, clip_norm=0.5, clipping_style=style)
    assert len(reads) > 10 and any(read[0] for read in reads) and any(read[2] for read in reads)
    for held, scanned, forward, forward_scanned in reads:
        assert (held, forward) == (scanned, forward_scanned)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_following_the_memory_bound_costs_the_same_per_layer_at_any_depth(monkeypatch, style):
    """The bound is read at every tap of a model with deferred layers. Reading it must not scan what the engine
    holds (which grows with depth): the storages it looks at per step grow linearly with the layers (a scan per tap
    grows quadratically: 16x from 4 to 16 blocks, against ~4x)."""
    looks = []
    is_forward = ClippingEngine._is_forward_storage
    monkeypatch.setattr(ClippingEngine, "_is_forward_storage",
                        lambda self, storage: looks.append(1) or is_forward(self, storage))  # fmt: skip
    counts = []
    for depth in (4, 16):
        torch.manual_seed(48)
        layers: list[nn.Module] = [nn.Conv2d(3, 32, 3, padding=1)]
        for _ in range(depth):
            layers += [nn.GroupNorm(4, 32), nn.Tanh(), nn.Conv2d(32, 32, 3, padding=1)]
        model = nn.Sequential(*layers, nn.Flatten(), nn.Linear(32 * 4 * 4, 2))
        inputs = (torch.randn(N_EXAMPLES, 3, 4, 4), torch.randn(N_EXAMPLES, 2))
        looks.clear()
        _, eng = run_engine(model, squared_error, [(inputs, default_mask())], clip_norm=0.5, clipping_style=style)
        assert eng._tracks_peak  # 16 positions, 32 x 288 weights: deferred, so the bound is followed
        counts.append(len(looks))
    assert counts[1] < 5 * counts[0]


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
def test_one_outlier_moves_the_clipped_sum_by_at_most_c_through_the_deferred_paths(style):
    """Reference: the DP bound. Through every path of the deferred norm modes at once (the benchmark CNN's shape:
    the third convolution deferred and instantiated after the backward, the second approved, GroupNorm from torch's
    kernel; layer-wise: the third's group postponed, the norm layers' groups clipped together at the end), removing
    one example (masked: it contributes exactly zero), an outlier with inputs x 1000, moves the clipped sum by at
    most C."""
    torch.manual_seed(46)
    model = _ConvStack()
    x, y = torch.randn(N_EXAMPLES, 3, 32, 32), torch.randn(N_EXAMPLES, 2)
    x[0] *= 1000
    clip_norm = 0.5
    sums = []
    for mask in (torch.ones(N_EXAMPLES, dtype=torch.bool), torch.arange(N_EXAMPLES) > 0):
        got, eng = run_engine(model, squared_error, [((x, y), mask)] * 2, clip_norm=clip_norm,
                              clipping_function="abadi", clipping_style=style)  # fmt: skip
        sums.append(torch.cat([got[name].double().flatten() for name in sorted(got)]))
    assert eng.last_norm_modes["features.6"] == "instantiate"
    assert (sums[0] - sums[1]).norm() / 2 <= clip_norm * (1 + 1e-5)  # two physical batches: 2 x the step's sum


def test_an_instantiated_convolution_lets_go_of_its_input_and_output_gradient():
    """Once a convolution's per-example gradients are instantiated, nothing else of the layer is needed: its
    contribution must not keep the input and the output gradient alive to the end of the backward (10 of the
    benchmark CNN's 15 MB held at the clipping)."""
    conv = nn.Conv2d(8, 8, 3, padding=1)
    x, grad = torch.randn(4, 8, 16, 16), torch.randn(4, 8, 16, 16)
    (contribution,) = conv_rules.conv_rule(conv, x, grad, {"weight": "w"})
    storages = [weakref.ref(t.untyped_storage()) for t in (x, grad)]
    contribution.choose_norm_mode(NormMode.INSTANTIATE)
    del x, grad
    gc.collect()
    assert contribution.instantiated is not None
    assert all(storage() is None for storage in storages)


class _SlicedInput(nn.Module):
    """A convolution whose input is a slice of a larger tensor (its storage starts at an offset) in a given memory
    format."""

    def __init__(self, memory_format: torch.memory_format) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2)  # no padding: the patches are read from the input itself
        self.head = nn.Linear(4, 2)
        self.memory_format = memory_format

    def forward(self, x: Tensor) -> Tensor:
        longer = torch.cat([torch.zeros_like(x[:1]), x]).contiguous(memory_format=self.memory_format)
        return self.head(torch.tanh(self.conv(longer[1:])).mean((2, 3)))  # its storage starts one example in


@pytest.mark.parametrize("way", CONV_WAYS)
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=str)
def test_convolution_inputs_in_any_layout_match_reference(monkeypatch, memory_format, way):
    """Reference: reference_clipped_sum. The patches are read from the input through strides: an input in channels
    last memory format, or one that starts at an offset in its storage, must give the same windows."""
    _instantiate_convolutions_by(monkeypatch, way)
    torch.manual_seed(6)
    inputs = (torch.randn(N_EXAMPLES, 3, 6, 5), torch.randn(N_EXAMPLES, 2))
    for norm_mode in NormMode:
        _matches_abadi_all_layer(_SlicedInput(memory_format), squared_error, inputs, 0.3, norm_mode)


def _record_and_check(eng: ClippingEngine, model: nn.Module, inputs, mask: Tensor, recording: list[bool]) -> None:
    """One physical batch through the engine (``recording[0]`` is True during its forward only), against
    reference_clipped_sum (all-layer, Abadi's clipping, C = 0.5)."""
    recording[0] = True
    with eng.recording(CPU):
        loss = squared_error(model, inputs).sum()
    recording[0] = False
    eng.backward(loss, mask)
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    assert_matches(eng.pop_summed(), expected, 0.5)


class InPlaceAfterEveryLayer(nn.Module):
    """Each layer type whose output the tap takes in place (engine._FRESH_OUTPUT_TYPES) followed by an in-place op on
    that output, and a Linear subclass (not taken in place: a subclass may return anything)."""

    class _Scaled(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x) * 2.0

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.ln = nn.LayerNorm(4)
        self.seq = nn.Linear(4, 4)  # on [n, 3, 4]: torch returns a view of its [3n, 4] result
        self.fc = nn.Linear(4, 3)
        self.sub = self._Scaled(3, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.conv(x))
        h = self.gn(h)
        h += 0.5  # on the tapped GroupNorm output itself
        h = self.ln(h.mean((2, 3)))
        h.mul_(1.5)
        h = self.seq(h.unsqueeze(1) * torch.arange(1.0, 4.0).view(1, 3, 1))
        h.relu_()
        h = self.fc(h.mean(1))
        h.tanh_()
        return self.sub(h)


def test_outputs_tapped_in_place_stay_exact_under_in_place_ops():
    """Reference: reference_clipped_sum of three physical batches (the first is watched and tapped by copy, the
    later ones in place); the layers of _FRESH_OUTPUT_TYPES hand on their own output's memory (a 3-d Linear a view of
    the tensor it viewed), the subclass a copy."""
    torch.manual_seed(41)
    model = InPlaceAfterEveryLayer()
    batches = []
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        inputs = (torch.randn(N_EXAMPLES, 2, 5, 5, generator=gen), torch.randn(N_EXAMPLES, 2, generator=gen))
        batches.append((inputs, default_mask()))
    same: dict[str, list[bool]] = {"conv": [], "gn": [], "ln": [], "seq": [], "fc": [], "sub": []}
    raw: dict[str, int] = {}
    for name in same:
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, a, out, n=name: raw.__setitem__(n, out.data_ptr()), prepend=True)

    _, eng = run_engine(model, squared_error, [], clip_norm=0.5, clipping_function="abadi")
    for name in same:  # after the engine's hook: the tensor the rest of the forward sees
        module = model.get_submodule(name)
        module.register_forward_hook(
            lambda m, a, out, n=name: same[n].append(out.data_ptr() == raw[n]) if recording[0] else None
        )
    recording = [False]
    for inputs, mask in batches:
        _record_and_check(eng, model, inputs, mask, recording)
    assert same == {"conv": [False, True, True], "gn": [False, True, True], "ln": [False, True, True],
                    "seq": [False, True, True], "fc": [False, True, True], "sub": [False, False, False]}  # fmt: skip


class _EmbeddingThenInPlace(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(7, 4, padding_idx=0)
        self.fc = nn.Linear(4, 2)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.emb(ids)  # [n, T, 4]: a view of the [n T, 4] rows it gathered
        h.mul_(torch.arange(1.0, 5.0))  # in place on the tapped output
        return self.fc(h.tanh()).sum(1)


def test_an_embedding_output_tapped_in_place_stays_exact_under_an_in_place_op():
    """Reference: reference_clipped_sum of three physical batches; from the second (not watched) on, the embedding
    hands on its own output's memory (no copy), and the in-place op after it stays legal and exact."""
    torch.manual_seed(42)
    model = _EmbeddingThenInPlace()
    raw: list[int] = []
    same: list[bool] = []
    recording = [False]
    model.emb.register_forward_hook(lambda m, a, out: raw.append(out.data_ptr()), prepend=True)
    _, eng = run_engine(model, squared_error, [], clip_norm=0.5, clipping_function="abadi")
    model.emb.register_forward_hook(lambda m, a, out: same.append(out.data_ptr() == raw[-1]) if recording[0] else None)
    for seed in range(3):
        gen = torch.Generator().manual_seed(seed)
        inputs = (torch.randint(0, 7, (N_EXAMPLES, 5), generator=gen), torch.randn(N_EXAMPLES, 2, generator=gen))
        _record_and_check(eng, model, inputs, default_mask(), recording)
    assert same == [False, True, True]


@pytest.mark.parametrize("norm_mode", list(NormMode), ids=str)
def test_a_non_finite_example_through_a_convolution_contributes_nothing(norm_mode):
    """Reference: reference_clipped_sum over the other examples. One example's input is inf: its norms are non-finite,
    so it is dropped, and the convolution's clipped sum comes from its factors cleaned of that row (the patches a
    ghost norm dropped are rebuilt for it) instead of the weight-gradient convolution, where 0 * inf would be NaN."""
    torch.manual_seed(41)
    model = TwiceConv()
    x, y = torch.randn(N_EXAMPLES, 3, 6, 6), torch.randn(N_EXAMPLES, 2)
    x[1, 0, 1, 1] = float("inf")  # a real example (row 2 of the default mask is padding)
    mask = default_mask()
    kept = mask.clone()
    kept[1] = False
    clean = (torch.where(torch.isfinite(x), x, torch.zeros(())), y)  # the reference never runs row 1 anyway
    expected = reference_clipped_sum(model, squared_error, clean, kept, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, engine = run_engine(model, squared_error, [((x, y), mask)], clip_norm=0.5, clipping_function="abadi",
                             norm_mode=norm_mode)  # fmt: skip
    assert engine.non_finite_examples == 1
    assert all(torch.isfinite(v).all() for v in got.values())
    assert_matches(got, expected, 0.5)


@pytest.mark.parametrize("policy", ["zero", "raise"])
def test_a_norm_beyond_fp32_counts_as_non_finite(policy):
    """Reference: reference_clipped_sum over the other examples. One example's inputs and output gradients are 1e20
    (finite in fp32); its ghost norm, from rescaled Gram matrices, is finite in float64 with no cancellation, so it
    passes the exactness tests, but the norm itself (~2.6e42) is not finite in fp32: that example is non-finite
    (dropped and counted, or the step refused), not clipped by a factor computed from an infinite norm."""
    torch.manual_seed(43)
    model = nn.Linear(64, 64, bias=False)  # ghost norm at T = 2: P D = 4096 > T (P + D)
    with torch.no_grad():
        model.weight.zero_()  # output 0: d loss / d output = -y
    x, y = torch.randn(N_EXAMPLES, 2, 64), torch.randn(N_EXAMPLES, 2, 64)
    x[1], y[1] = 1e20, -1e20
    mask = default_mask()
    if policy == "raise":
        with pytest.raises(FloatingPointError, match="non-finite gradient norm"):
            run_engine(model, squared_error, [((x, y), mask)], clip_norm=0.5, clipping_function="abadi",
                       non_finite="raise")  # fmt: skip
        return
    kept = mask.clone()
    kept[1] = False
    expected = reference_clipped_sum(model, squared_error, (x, y), kept, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, engine = run_engine(model, squared_error, [((x, y), mask)], clip_norm=0.5, clipping_function="abadi")
    assert engine.last_norm_modes[""] == "ghost" and engine.exact_recomputations == 0
    assert engine.non_finite_examples == 1
    assert_matches(got, expected, 0.5)


def test_per_example_vectors_whose_squares_overflow_fp32_are_clipped_by_their_exact_norm():
    """Reference: reference_clipped_sum (float64). One example's targets are 1e20: the bias's and the LayerNorm's
    per-example gradients (small vectors, squared norms formed from fp32 squares) have squares beyond fp32 while
    their norms (~1e20) are within it. Those squared norms must come out non-finite and be recomputed exactly, so
    that the example is clipped to C by its true norm, not dropped nor scaled by a wrong factor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8))
    x, y = torch.randn(N_EXAMPLES, 8), torch.randn(N_EXAMPLES, 8)
    y[1] = 1e20
    mask = default_mask()
    expected = reference_clipped_sum(model, squared_error, (x, y), mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, engine = run_engine(model, squared_error, [((x, y), mask)], clip_norm=0.5, clipping_function="abadi")
    assert engine.exact_recomputations >= 1 and engine.non_finite_examples == 0
    assert_matches(got, expected, 0.5)


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("build", [tied_gpt, twice_linear], ids=lambda b: b.__name__)
def test_sink_streams_each_parameter_once_per_physical_batch(build, style):
    """Reference: reference_clipped_sum over the union of two physical batches. With a sink (dp_zero3, dp_fsdp), each
    physical batch hands every parameter's clipped sum to the sink exactly once (full shape, fp32), in the same order
    every batch, and the engine keeps no sum between batches; the sink's totals equal the reference."""
    model, loss_fn, inputs = build()
    mask = default_mask()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=0.5, style=style, function="abadi")
    eng = ClippingEngine(
        model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.5, clipping_style=style, clipping_function="abadi")
    )
    eng.attach()
    calls: list[list[str]] = []
    totals: dict[str, Tensor] = {}

    def sink(name: str, grad: Tensor | None) -> None:
        calls[-1].append(name)
        assert grad is not None and grad.dtype == torch.float32 and grad.shape == eng.params[name].shape
        totals[name] = totals[name] + grad if name in totals else grad.clone()

    eng.sink = sink
    for part in (slice(0, 3), slice(3, None)):
        calls.append([])
        with eng.recording(CPU):
            loss = loss_fn(model, tuple(x[part] for x in inputs)).sum()
        eng.backward(loss, mask[part])
        assert eng.summed == {}
        assert sorted(calls[-1]) == sorted(eng.params)
    assert calls[0] == calls[1]
    assert eng.pop_summed() == {}
    assert_matches(totals, expected, 0.5)


def test_pop_summed_resets_between_logical_steps():
    """Reference: ClippingEngine.pop_summed docstring (returns the step's sums and resets)."""
    model, loss_fn, inputs = SHARING_CASES["twice_linear_flat"]()
    mask = default_mask()
    eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.4))
    eng.attach()
    results = []
    for _ in range(2):
        with eng.recording(CPU):
            loss = loss_fn(model, inputs).sum()
        eng.backward(loss, mask)
        results.append(eng.pop_summed())
    for name in results[0]:
        assert torch.equal(results[0][name], results[1][name]), name
    assert eng.pop_summed() == {}


# ---------------------------------------------------------------------------------------------- norm modes
def _single_linear(seq_len: int, width: int) -> Built:
    torch.manual_seed(90)
    model = nn.Sequential(nn.Linear(width, width))
    x = torch.randn(N_EXAMPLES, seq_len, width)
    y = torch.randn(N_EXAMPLES, seq_len, width)
    return model, squared_error, (x, y)


def test_auto_uses_ghost_norm_for_short_sequences(monkeypatch):
    """Reference: DESIGN.md section 2.3 / contributions.choose_norm_mode (2T^2 <= PD -> ghost) and reference.py."""
    model, loss_fn, inputs = _single_linear(seq_len=4, width=64)
    mask = default_mask()
    seen = []
    original = engine_module.self_inner

    def spy(c):
        seen.append((c.kind, c.instantiated is None))
        return original(c)

    monkeypatch.setattr(engine_module, "self_inner", spy)
    expected = reference_clipped_sum(
        model, loss_fn, inputs, mask, clip_norm=1.0, style="all-layer", function="automatic"
    )
    got, eng = run_engine(model, loss_fn, [(inputs, mask)], clip_norm=1.0, norm_mode="auto")
    assert eng.last_norm_modes == {"0": "ghost"}
    assert seen and all(not_instantiated for _, not_instantiated in seen), seen
    assert_matches(got, expected, 1.0)


@pytest.mark.parametrize(
    ("seq_len", "width", "mode", "expected_mode"),
    [
        (4, 64, "ghost", "ghost"),
        (4, 64, "instantiate", "instantiate"),
        (64, 2, "auto", "instantiate"),  # 2 T^2 > P D
        (64, 2, "ghost", "ghost"),
        (1, 8, "auto", "direct"),  # T = 1: ||a|| ||b||
    ],
)
def test_norm_mode_choice_and_result(seq_len, width, mode, expected_mode):
    """Reference: NormMode docstring for the choice; reference_clipped_sum for the values."""
    model, loss_fn, inputs = _single_linear(seq_len, width)
    mask = default_mask()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=2.0, style="param-wise", function="abadi")
    got, eng = run_engine(
        model,
        loss_fn,
        [(inputs, mask)],
        clip_norm=2.0,
        clipping_style="param-wise",
        clipping_function="abadi",
        norm_mode=mode,
    )
    assert eng.last_norm_modes == {"0": expected_mode}
    assert_matches(got, expected, 2.0)


# ---------------------------------------------------------------------------------------------- refusals
def _engine(model: nn.Module) -> ClippingEngine:
    return ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0))


def test_batchnorm_is_refused_with_groupnorm_advice():
    """Reference: DESIGN.md section 6 (BatchNorm -> error naming the module and suggesting GroupNorm)."""
    model = nn.Sequential()
    model.add_module("features", nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    with pytest.raises(UnsupportedLayerError) as info:
        _engine(model)
    assert "features.1" in str(info.value) and "GroupNorm" in str(info.value)
    assert info.value.path == "features.1"


@pytest.mark.parametrize(
    ("module", "path"),
    [
        (nn.PReLU(), "block.act"),
        (nn.MultiheadAttention(4, 2), "block.act"),
    ],
    ids=["PReLU", "MultiheadAttention"],
)
def test_unsupported_trainable_module_is_named(module, path):
    """Reference: DESIGN.md section 6 (unsupported trainable layer -> error naming the module path and the fix), with
    the torch.func fallback switched off."""
    model = nn.Sequential()
    block = nn.Module()
    block.lin = nn.Linear(4, 4)
    block.act = module
    model.add_module("block", block)
    with pytest.raises(UnsupportedLayerError) as info:
        ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, functorch_fallback=False))
    message = str(info.value)
    assert f"'{path}'" in message and type(module).__name__ in message
    assert "requires_grad_(False)" in message or "register_rule" in message or "replace_multihead_attention" in message


def test_a_subclass_that_changes_forward_gets_no_rule_of_its_parent():
    """Reference: clipping/registry.py docstring (a subclass that overrides forward is not its parent: no rule; the
    torch.func fallback takes it, or it is refused without the fallback) and tests/reference.py (a subclass that
    keeps forward uses its parent's rule; the one that doubles its input matches the reference through the
    fallback)."""

    class MyLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(2 * x)

    class SameLinear(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(SameLinear(3, 3), nn.Tanh(), MyLinear(3, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'2' \(MyLinear\)"):
        ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, functorch_fallback=False))
    inputs = (torch.randn(5, 3), torch.randn(5, 2))
    got, engine = run_engine(model, squared_error, [(inputs, torch.ones(5, dtype=torch.bool))], clip_norm=0.3)
    assert engine.layers[0].rule is not engine.layers[1].rule  # the parent's rule, the fallback
    expected = reference_clipped_sum(
        model, squared_error, inputs, torch.ones(5, dtype=torch.bool), clip_norm=0.3, style="all-layer",
        function="automatic",
    )  # fmt: skip
    assert_matches(got, expected, 0.3)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_norm": 1.0}, "max_norm"),
        ({"scale_grad_by_freq": True}, "scale_grad_by_freq"),
        ({"sparse": True}, "sparse"),
    ],
)
def test_embedding_settings_that_mix_or_renormalise_are_refused(kwargs, needle):
    """Reference: clipping/rules/embedding.py (max_norm renormalises in place; scale_grad_by_freq mixes examples)."""
    model = nn.Sequential(nn.Embedding(10, 4, **kwargs), nn.Linear(4, 2))
    with pytest.raises(UnsupportedLayerError, match=needle) as info:
        _engine(model)
    assert "'0'" in str(info.value)


def test_frozen_unsupported_modules_are_fine():
    """Reference: reference_clipped_sum (frozen PReLU and eval-mode frozen BatchNorm are constants of the model)."""
    torch.manual_seed(99)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.PReLU(), nn.Flatten(), nn.Linear(27, 2))
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    model[1].requires_grad_(False).eval()
    model[2].requires_grad_(False)
    inputs = (torch.randn(N_EXAMPLES, 2, 5, 5), torch.randn(N_EXAMPLES, 2))
    mask = default_mask()
    expected = reference_clipped_sum(
        model, squared_error, inputs, mask, clip_norm=0.5, style="layer-wise", function="abadi"
    )
    got, _ = run_engine(
        model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_style="layer-wise", clipping_function="abadi"
    )
    assert set(got) == {"0.weight", "0.bias", "4.weight", "4.bias"}
    assert_matches(got, expected, 0.5)


def test_model_without_trainable_parameters_is_refused():
    """Reference: ClippingEngine docstring (nothing to train privately -> ValueError)."""
    model = nn.Linear(3, 3).requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        _engine(model)


def test_frozen_batchnorm_in_training_mode_is_refused():
    """Reference: DESIGN.md section 6; a frozen BatchNorm still mixes examples through batch statistics."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].requires_grad_(False)
    eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0))
    eng.attach()
    model.train()
    with pytest.raises(UnsupportedLayerError, match="GroupNorm"):
        with eng.recording(CPU):
            model(torch.randn(3, 4))
    model.eval()  # running statistics only: examples stay independent
    with eng.recording(CPU):
        loss = model(torch.randn(3, 4)).sum(1).sum()
    eng.backward(loss, torch.ones(3, dtype=torch.bool))
    assert set(eng.pop_summed()) == {"0.weight", "0.bias"}


class _ConvHead(nn.Module):
    """A convolution, its per-example gradients instantiated (any way: CONV_WAYS)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.conv(x)).mean((2, 3))).unsqueeze(1)  # [n, 1, 3]


BF16_MODELS = {
    "linear": (lambda: nn.Sequential(nn.Linear(6, 5), nn.GELU(), nn.Linear(5, 3)), (4, 6), ("0.weight", "2.weight")),
    "conv by grouped convolution": (_ConvHead, (2, 5, 5), ("conv.weight",)),
    "conv from patches": (_ConvHead, (2, 5, 5), ("conv.weight",)),
    "conv from kernel-major windows": (_ConvHead, (2, 5, 5), ("conv.weight",)),
}


@pytest.mark.parametrize("upcast_rows", ["whole", "a few at a time"])
@pytest.mark.parametrize("name", list(BF16_MODELS))
def test_bf16_layers_keep_bf16_per_example_gradients_and_clip_exactly_what_they_sum(monkeypatch, name, upcast_rows):
    """Reference: under bf16 autocast an instantiated Linear's or convolution's per-example gradients are stored in
    bf16 (the precision of its own weight gradient there); the clipped sum must be sum_i c_i G_i of exactly those
    stored values, with c_i from their norms (float64 here), or the clip would bound something other than what is
    summed. Also with the fp32 upcast done a few examples (norms) or columns (clipped sums) at a time
    (contributions._UPCAST_CHUNK)."""
    import lightning_dpzero.clipping.contributions as contributions_module

    if upcast_rows != "whole":
        monkeypatch.setattr(contributions_module, "_UPCAST_CHUNK", 20)
    _instantiate_convolutions_by(
        monkeypatch, CONV_WAYS[0] if "grouped" in name else CONV_WAYS[3] if "kernel-major" in name else CONV_WAYS[1]
    )
    torch.manual_seed(42)
    build, shape, bf16_params = BF16_MODELS[name]
    model = build()
    x, w = torch.randn(N_EXAMPLES, *shape), torch.randn(N_EXAMPLES, shape[0] if name == "linear" else 1, 3)
    held: dict[str, list[Tensor]] = {}
    finalize = ClippingEngine._finalize

    def spy(self, groups, last=False):
        for (param, _), contributions in self._contributions.items():
            held[param] = [  # each example's block in the parameter's layout
                torch.stack([c.to_param(m) for m in c.instantiated]) if c.to_param and c.instantiated is not None
                else c.instantiated if c.instantiated is not None else c.left
                for c in contributions
            ]  # fmt: skip
        return finalize(self, groups, last)

    monkeypatch.setattr(ClippingEngine, "_finalize", spy)
    eng = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.05, clipping_function="abadi",
                                              norm_mode="instantiate"))  # fmt: skip
    eng.attach()
    with eng.recording(CPU), torch.autocast("cpu", dtype=torch.bfloat16):
        loss = (model(x) * w).sum((1, 2))
    eng.backward(loss.float().sum(), torch.ones(N_EXAMPLES, dtype=torch.bool))
    got = eng.pop_summed()
    for param in bf16_params:
        assert held[param][0].dtype == torch.bfloat16, param
    blocks = {param: sum(t.double() for t in tensors) for param, tensors in held.items()}  # [n, ...] each
    norms = torch.stack([b.reshape(N_EXAMPLES, -1).square().sum(1) for b in blocks.values()]).sum(0).sqrt()
    factors = (0.05 / norms).clamp(max=1.0)
    assert (factors < 1).all()  # every example clipped: the bound is what is tested
    for param, block in blocks.items():
        expected = torch.einsum("n,n...->...", factors, block).reshape(got[param].shape)
        torch.testing.assert_close(got[param].double(), expected, rtol=1e-5, atol=1e-7, msg=param)
