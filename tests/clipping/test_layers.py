"""DPMultiheadAttention: the same function as nn.MultiheadAttention, clipped through the Linear rule."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from lightning_dpzero.clipping import ClippingEngine, UnsupportedLayerError
from lightning_dpzero.config import PrivacyConfig
from lightning_dpzero.layers import DPMultiheadAttention, replace_multihead_attention
from tests.reference import reference_clipped_sum


class Block(nn.Module):
    def __init__(self, batch_first: bool) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.attn = nn.MultiheadAttention(8, 2, batch_first=batch_first)

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None, need_weights: bool = False) -> Tensor:
        h = x if self.batch_first else x.transpose(0, 1)
        out, _ = self.attn(h, h, h, key_padding_mask=key_padding_mask, need_weights=need_weights)
        return out if self.batch_first else out.transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
def test_replacement_computes_the_same_function(batch_first: bool, need_weights: bool) -> None:
    """Reference: torch's nn.MultiheadAttention on the same weights, inputs and masks."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)  # [n, L, E]
    padding = torch.zeros(3, 5, dtype=torch.bool)
    padding[0, -2:] = True
    causal = torch.ones(5, 5, dtype=torch.bool).triu(1)
    block = Block(batch_first).eval()
    h = x if batch_first else x.transpose(0, 1)
    expected, expected_w = block.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
    replace_multihead_attention(block)
    assert isinstance(block.attn, DPMultiheadAttention)
    got, got_w = block.attn(h, h, h, key_padding_mask=padding, attn_mask=causal, need_weights=need_weights)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    if need_weights:
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("batch_first", [True, False])
def test_clipped_sum_through_the_drop_in_matches_reference(batch_first: bool) -> None:
    """Reference: tests/reference.py; nn.MultiheadAttention itself is refused with the replacement as the fix."""
    torch.manual_seed(1)
    model = Block(batch_first)
    with pytest.raises(UnsupportedLayerError, match="replace_multihead_attention"):
        ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0))
    replace_multihead_attention(model)
    x, y = torch.randn(4, 5, 8), torch.randn(4, 5, 8)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)

    def loss(m: nn.Module, batch: tuple[Tensor, ...]) -> Tensor:
        return (m(batch[0]) - batch[1]).square().flatten(1).mean(1)

    engine = ClippingEngine(model, PrivacyConfig(noise_multiplier=1.0, clip_norm=0.1, clipping_function="abadi"))
    engine.attach()
    with engine.recording(torch.device("cpu")):
        total = loss(model, (x, y)).sum()
    engine.backward(total, mask)
    got = engine.pop_summed()
    expected = reference_clipped_sum(model, loss, (x, y), mask, clip_norm=0.1, style="all-layer", function="abadi")
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-5, atol=1e-7)
