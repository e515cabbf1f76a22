"""DPMultiheadAttention: the same function as nn.MultiheadAttention, clipped through the Linear rule; and a
``batch_first`` nn.MultiheadAttention left as it is (nn.Transformer* layers), through the torch.func fallback."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import Tensor, nn

from lightning_dpzero.clipping import ClippingEngine, UnsupportedLayerError
from lightning_dpzero.config import ClippingFunction, ClippingStyle, NormMode, PrivacyConfig
from lightning_dpzero.layers import DPMultiheadAttention, replace_multihead_attention
from tests.clipping.test_engine import assert_matches, run_engine, split_clip_norm
from tests.conftest import N_EXAMPLES, Built, default_mask, squared_error
from tests.reference import reference_clipped_sum, reference_factors

E, H, L = 8, 2, 5  # embed_dim, heads, sequence length


def _masks(kind: str, n: int, source: int) -> tuple[Tensor, Tensor]:
    """(attn_mask, key_padding_mask): bool causal [L, S] and padding [n, S], or additive float [n * H, L, S], [n, S]."""
    torch.manual_seed(3)
    padding = torch.zeros(n, source, dtype=torch.bool)
    padding[0, -2:] = True
    if kind == "bool":
        return torch.ones(L, source, dtype=torch.bool).triu(1), padding
    attn = torch.randn(n * H, L, source)
    return attn, torch.zeros(n, source).masked_fill(padding, float("-inf"))


def _seq_first(x: Tensor, batch_first: bool) -> Tensor:
    return x if batch_first else x.transpose(0, 1)


@pytest.mark.parametrize("masks", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("batch_first", [True, False])
def test_replacement_computes_the_same_function(batch_first: bool, need_weights: bool, masks: str) -> None:
    """Reference: torch's nn.MultiheadAttention on the same weights, inputs and masks."""
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(E, H, batch_first=batch_first).eval()
    x = _seq_first(torch.randn(3, L, E), batch_first)
    attn_mask, padding = _masks(masks, 3, L)
    kwargs = dict(key_padding_mask=padding, attn_mask=attn_mask, need_weights=need_weights)
    expected, expected_w = mha(x, x, x, **kwargs)
    dp = replace_multihead_attention(mha)
    assert isinstance(dp, DPMultiheadAttention) and not dp.training
    got, got_w = dp(x, x, x, **kwargs)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert (got_w is None) == (expected_w is None)
    if need_weights:
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("unbatched", [False, True])
def test_cross_attention_with_kdim_vdim_and_no_bias(unbatched: bool) -> None:
    """Reference: nn.MultiheadAttention with separate q/k/v weights (kdim, vdim), S != L, per-head weights."""
    torch.manual_seed(1)
    mha = nn.MultiheadAttention(E, H, bias=False, kdim=6, vdim=4)
    q, k, v = torch.randn(L, 3, E), torch.randn(7, 3, 6), torch.randn(7, 3, 4)  # [L or S, n, features]
    if unbatched:
        q, k, v = q[:, 0], k[:, 0], v[:, 0]
    expected = mha(q, k, v, average_attn_weights=False)
    dp = replace_multihead_attention(copy.deepcopy(mha))
    assert dp.q_proj.bias is None and dp.k_proj.in_features == 6 and dp.v_proj.in_features == 4
    got = dp(q, k, v, average_attn_weights=False)
    for g, e in zip(got, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")  # torch's own fused path, the reference
@pytest.mark.parametrize("train", [True, False])
def test_transformer_encoder_after_replacement(train: bool) -> None:
    """Reference: the original nn.TransformerEncoder, also in eval mode where torch would take its fused path."""
    torch.manual_seed(2)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=16, dropout=0.0, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).train(train)
    x = torch.randn(3, L, E)
    padding = torch.zeros(3, L, dtype=torch.bool)
    padding[0, -2:] = True
    dp = replace_multihead_attention(copy.deepcopy(encoder))
    assert all(isinstance(m.self_attn, DPMultiheadAttention) for m in dp.layers)
    with torch.no_grad():
        expected, got = encoder(x, src_key_padding_mask=padding), dp(x, src_key_padding_mask=padding)
    torch.testing.assert_close(got[~padding], expected[~padding], rtol=1e-5, atol=1e-6)


def test_replacement_keeps_flags_and_skips_subclasses() -> None:
    """Reference: replace_multihead_attention docstring (training mode and requires_grad kept; exact type only)."""

    class MyAttention(nn.MultiheadAttention):
        pass

    model = nn.ModuleDict({"a": nn.MultiheadAttention(E, H).eval(), "b": MyAttention(E, H)})
    model["a"].out_proj.requires_grad_(False)
    assert replace_multihead_attention(model) is model
    a = model["a"]
    assert isinstance(a, DPMultiheadAttention) and not a.training
    assert not a.out_proj.weight.requires_grad and a.q_proj.weight.requires_grad
    assert type(model["b"]) is MyAttention


def test_add_bias_kv_and_add_zero_attn_are_refused() -> None:
    """Reference: DPMultiheadAttention docstring (add_bias_kv / add_zero_attn refused with the fix)."""
    with pytest.raises(ValueError, match="add_bias_kv"):
        DPMultiheadAttention(E, H, add_bias_kv=True)
    with pytest.raises(ValueError, match="add_zero_attn"):
        DPMultiheadAttention(E, H, add_zero_attn=True)
    with pytest.raises(ValueError, match="add_bias_kv"):
        replace_multihead_attention(nn.Sequential(nn.MultiheadAttention(E, H, add_zero_attn=True)))


# ---------------------------------------------------------------------------------------------- clipping
class AttentionBlock(nn.Module):
    """Self-attention with padding and causal masks, then a head; examples first at the model's boundary."""

    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(E, H, batch_first=batch_first)
        self.head = nn.Linear(E, 2)

    def forward(self, x: Tensor) -> Tensor:
        padding = torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
        padding[:, -1] = x[:, 0, 0] > 0  # per example: which rows are padded depends on the data
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).triu(1)
        h = _seq_first(x, self.batch_first)
        out, _ = self.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=self.batch_first)
        return self.head(torch.tanh(_seq_first(out, self.batch_first)))


def attention_block(batch_first: bool) -> Built:
    torch.manual_seed(4)
    model = replace_multihead_attention(AttentionBlock(batch_first))
    return model, squared_error, (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))


def test_sequence_first_multihead_attention_trains_unchanged_through_the_fallback() -> None:
    """Reference: reference_clipped_sum. A sequence-first nn.MultiheadAttention with a per-example padding mask
    ([n, L], examples in dim 0) and a causal mask shared by the examples: the watch follows the transpose to its
    [L, n, E] query, and the fallback splits the query, key and value along dim 1 and the padding mask along dim 0."""
    torch.manual_seed(4)
    model = AttentionBlock(False)
    inputs = (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))
    mask = default_mask()
    expected = reference_clipped_sum(
        model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer", function="abadi"
    )
    got, _ = run_engine(model, squared_error, [(inputs, mask)] * 2, clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, {k: 2 * v for k, v in expected.items()}, 0.5)


def test_multihead_attention_is_refused_with_the_fixes() -> None:
    """Reference: DESIGN.md section 6 (unsupported layer -> error naming the module and the fix): sequence-first but
    called on batch-first tensors (its dim 1 is not the examples); batch-first with need_weights=True (the averaged
    weights' gradient would be missed)."""

    class Misused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.attn = nn.MultiheadAttention(E, H)  # batch_first=False

        def forward(self, x: Tensor) -> Tensor:
            return self.attn(x, x, x, need_weights=False)[0]

    misused = Misused()
    engine = ClippingEngine(misused, PrivacyConfig(noise_multiplier=1.0))
    engine.attach()
    with pytest.raises(UnsupportedLayerError, match=r"'attn' \(MultiheadAttention\).*not found in dim 1.*batch_first"):
        with engine.recording(torch.device("cpu"), rows=N_EXAMPLES):
            misused(torch.randn(N_EXAMPLES, L, E))
    model, loss_fn, (inputs, targets) = AttentionBlock(True), squared_error, attention_block(True)[2]
    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0))
    engine.attach()
    with pytest.raises(UnsupportedLayerError, match=r"'attn' \(MultiheadAttention\).*need_weights=False"):
        with engine.recording(torch.device("cpu"), rows=N_EXAMPLES):
            loss_fn(model, (inputs, targets))


@pytest.mark.parametrize(
    ("batch_first", "style", "function", "norm_mode"),
    [
        *[(False, s, f, NormMode.AUTO) for s in ClippingStyle for f in ClippingFunction],
        *[(True, ClippingStyle.ALL_LAYER, ClippingFunction.ABADI, m) for m in NormMode],
        (False, ClippingStyle.LAYER_WISE, ClippingFunction.AUTOMATIC, NormMode.GHOST),
    ],
    ids=str,
)
def test_clipped_sum_through_the_drop_in_matches_reference(batch_first, style, function, norm_mode) -> None:
    """Reference: tests/reference.py reference_clipped_sum (float64 per-example autograd)."""
    model, loss_fn, inputs = attention_block(batch_first)
    mask = default_mask()
    groups = 2 if style is ClippingStyle.GROUP_WISE else None
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


def test_clipped_sum_through_a_transformer_encoder_layer() -> None:
    """Reference: reference_clipped_sum on nn.TransformerEncoderLayer(batch_first=True) after the replacement."""
    torch.manual_seed(5)
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=12, dropout=0.0, batch_first=True)
    model = replace_multihead_attention(nn.Sequential(layer, nn.Linear(E, 2)))
    inputs = (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))
    mask = default_mask()
    expected = reference_clipped_sum(
        model, squared_error, inputs, mask, clip_norm=0.5, style="layer-wise", function="abadi"
    )
    got, _ = run_engine(
        model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_style="layer-wise", clipping_function="abadi"
    )
    assert_matches(got, expected, 0.5)


def _causal_lm_loss(model: nn.Module, inputs: tuple[Tensor, ...]) -> Tensor:
    """lightning.pytorch.demos.Transformer's own loss, per example: [n]."""
    (tokens,) = inputs
    n, t = tokens.shape
    out = model(tokens, tokens).view(n, t, -1)  # log-probabilities
    return torch.nn.functional.nll_loss(out.transpose(1, 2), tokens, reduction="none").mean(1)


def _demo_transformer() -> nn.Module:
    from lightning.pytorch.demos import Transformer

    return Transformer(vocab_size=30, ninp=E, nhead=H, nhid=12, nlayers=1, dropout=0.0)


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=12, dropout=0.0, batch_first=True)
    return nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(E, 2))


@pytest.mark.parametrize("style", ["all-layer", "layer-wise"])
@pytest.mark.parametrize("name", ["demos.Transformer", "nn.TransformerEncoder"])
def test_batch_first_multihead_attention_trains_unchanged_through_the_fallback(name: str, style: str) -> None:
    """Reference: reference_clipped_sum, with no change to the model: Lightning's demo Transformer (encoder and
    decoder, causal masks shared by the batch) and a 2-layer nn.TransformerEncoder; nn.MultiheadAttention's own
    parameters and its out_proj (read by F.multi_head_attention_forward, never called) through the fallback."""
    torch.manual_seed(6)
    if name == "demos.Transformer":
        model, loss_fn = _demo_transformer(), _causal_lm_loss
        inputs: tuple[Tensor, ...] = (torch.randint(0, 30, (N_EXAMPLES, L)),)
    else:
        model, loss_fn = _encoder(), squared_error
        inputs = (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))
    mask = default_mask()
    expected = reference_clipped_sum(model, loss_fn, inputs, mask, clip_norm=0.5, style=style, function="abadi")
    got, _ = run_engine(
        model, loss_fn, [(inputs, mask)], clip_norm=0.5, clipping_style=style, clipping_function="abadi"
    )
    assert set(got) == set(expected)
    assert_matches(got, expected, 0.5)


def _same_masks_reference(model: nn.Module, loss_fn, inputs: tuple[Tensor, ...], clip_norm: float) -> dict:
    """sum_i min(1, C / ||g_i||) g_i, with g_i autograd's gradient of example i's loss through the batched forward
    itself (so through the dropout masks that forward drew); the examples do not interact, so g_i is example i's."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    losses = loss_fn(model, inputs)
    total = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for i in range(losses.shape[0]):
        grads = torch.autograd.grad(losses[i], list(params.values()), retain_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params.values(), grads)]
        norm = torch.sqrt(sum(g.double().square().sum() for g in grads))
        factor = torch.clamp(clip_norm / norm, max=1.0)
        for name, g in zip(params, grads):
            total[name] += factor * g.double()
    return total


@pytest.mark.parametrize("name", ["nn.TransformerEncoder", "demos.Transformer"])
def test_attention_dropout_is_replayed_by_the_fallback(name: str) -> None:
    """Reference: _same_masks_reference above, from the same generator state (the same masks in every dropout),
    rtol 1e-4 (both in fp32). The fallback recomputes nn.MultiheadAttention per example with its dropout draws
    replayed, and checks that the recomputed output is the forward's; Lightning's demo Transformer keeps its
    default dropout 0.2."""
    from lightning.pytorch.demos import Transformer

    torch.manual_seed(7)
    if name == "demos.Transformer":
        model, loss_fn = Transformer(vocab_size=30, ninp=E, nhead=H, nhid=12, nlayers=1), _causal_lm_loss
        inputs: tuple[Tensor, ...] = (torch.randint(0, 30, (N_EXAMPLES, L)),)
    else:
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=12, dropout=0.3, batch_first=True)
        model = nn.Sequential(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False), nn.Linear(E, 2))
        loss_fn, inputs = squared_error, (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))
    model.train()
    mask = torch.ones(N_EXAMPLES, dtype=torch.bool)
    with torch.random.fork_rng():
        torch.manual_seed(11)
        got, _ = run_engine(model, loss_fn, [(inputs, mask)], clip_norm=0.5, clipping_function="abadi")
    with torch.random.fork_rng():
        torch.manual_seed(11)
        expected = _same_masks_reference(model, loss_fn, inputs, 0.5)
    with torch.random.fork_rng():
        torch.manual_seed(12)  # other masks: a different gradient, so the comparison above can fail
        other = _same_masks_reference(model, loss_fn, inputs, 0.5)
    assert any(not torch.allclose(other[k], expected[k], rtol=1e-3) for k in expected)
    assert set(got) == set(expected)
    for key, value in expected.items():
        torch.testing.assert_close(got[key].double(), value, rtol=1e-4, atol=1e-6, msg=key)


class _Jitter(nn.Module):
    """No rule; draws one scalar per forward, which a per-example recompute cannot draw again."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(E))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.weight * (1 + torch.rand(()))


def test_random_draws_the_fallback_cannot_replay_are_refused() -> None:
    """Reference: the replay is checked, not assumed: a draw whose shape is not the batch's comes out different in
    the recompute, and the module is refused with the fixes instead of clipping the gradient of another function."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Linear(E, E), _Jitter(), nn.Linear(E, 2))
    inputs = (torch.randn(N_EXAMPLES, L, E), torch.randn(N_EXAMPLES, L, 2))
    with pytest.raises(UnsupportedLayerError, match=r"'1' \(_Jitter\).*could not be replayed.*dropout to 0"):
        run_engine(model, squared_error, [(inputs, default_mask())], clip_norm=0.5)


class _BandEncoder(nn.Module):
    """A batch-first nn.TransformerEncoder with a [T, T] band mask shared by the examples (each position attends to
    its neighbours; not causal, so torch does not replace it by its own causal path)."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(E, H, dim_feedforward=12, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)
        self.head = nn.Linear(E, 2)

    def forward(self, x: Tensor) -> Tensor:
        t = torch.arange(x.shape[1])
        band = (t[:, None] - t[None, :]).abs() > 1  # True: not attended
        return self.head(self.encoder(x, mask=band))


def test_a_shared_attention_mask_as_long_as_the_batch_is_not_split_per_example() -> None:
    """Reference: reference_clipped_sum. With T = n the [T, T] band mask has the batch's length in dim 0, but it is
    one mask for every example: the fallback must pass it whole to each example's recomputation, not row by row."""
    torch.manual_seed(8)
    model = _BandEncoder()
    inputs = (torch.randn(N_EXAMPLES, N_EXAMPLES, E), torch.randn(N_EXAMPLES, N_EXAMPLES, 2))  # T = n
    mask = default_mask()
    expected = reference_clipped_sum(model, squared_error, inputs, mask, clip_norm=0.5, style="all-layer",
                                     function="abadi")  # fmt: skip
    got, _ = run_engine(model, squared_error, [(inputs, mask)], clip_norm=0.5, clipping_function="abadi")
    assert_matches(got, expected, 0.5)
