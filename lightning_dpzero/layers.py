"""DP-friendly drop-in layers.

``nn.MultiheadAttention`` computes its projections with a fused ``in_proj_weight`` inside
``F.multi_head_attention_forward`` (sequence-first), where no per-layer rule can see the per-example inputs.
``DPMultiheadAttention`` computes the same function from four ``nn.Linear`` modules on batch-first tensors, so the
Linear rule clips it; ``replace_multihead_attention`` swaps it in, weights included.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["DPMultiheadAttention", "replace_multihead_attention"]


class DPMultiheadAttention(nn.Module):
    """Same constructor and forward as ``nn.MultiheadAttention`` (``add_bias_kv``/``add_zero_attn`` refused).

    Shapes: n examples, L query positions, S key positions, E = embed_dim, H heads. Inputs are [L, n, E]
    (or [n, L, E] with ``batch_first``), as in torch; the projections always see examples first.
    """

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if add_bias_kv or add_zero_attn:
            raise ValueError("DPMultiheadAttention: add_bias_kv and add_zero_attn are not supported; set them False.")
        if embed_dim % num_heads:
            raise ValueError(f"DPMultiheadAttention: embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(kdim or embed_dim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(vdim or embed_dim, embed_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        if not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # -> [n, L/S, E]
        n, length, _ = query.shape
        h, d = self.num_heads, self.embed_dim // self.num_heads

        def heads(x: Tensor) -> Tensor:
            return x.view(n, -1, h, d).transpose(1, 2)  # [n, H, L/S, D/H]

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = _combined_mask(attn_mask, key_padding_mask, n, h, length, k.shape[2], q.dtype, is_causal)
        dropout = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / math.sqrt(d)  # [n, H, L, S]
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), dropout, self.training)
            out = weights @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
            weights = None
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)
        return out, weights


def _combined_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    length: int,
    source: int,
    dtype: torch.dtype,
    is_causal: bool,
) -> Tensor | None:
    """Additive float mask [n, H, L, S] (or broadcastable), -inf where attention is not allowed."""
    mask: Tensor | None = None

    def additive(m: Tensor) -> Tensor:
        return torch.zeros_like(m, dtype=dtype).masked_fill(m, float("-inf")) if m.dtype == torch.bool else m.to(dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool).triu(1)
    if attn_mask is not None:
        m = additive(attn_mask)
        mask = m.view(n, h, length, source) if m.dim() == 3 else m  # [n*H, L, S] or [L, S]
    if key_padding_mask is not None:
        kp = additive(key_padding_mask).view(n, 1, 1, source)
        mask = kp if mask is None else mask + kp
    return mask


def replace_multihead_attention(module: nn.Module) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` inside ``module`` for a ``DPMultiheadAttention`` with the same weights."""
    for name, child in list(module.named_children()):
        if isinstance(child, nn.MultiheadAttention):
            setattr(module, name, _converted(child))
        else:
            replace_multihead_attention(child)
    return module


def _converted(mha: nn.MultiheadAttention) -> DPMultiheadAttention:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError("replace_multihead_attention: add_bias_kv / add_zero_attn are not supported.")
    w = mha.in_proj_weight
    new = DPMultiheadAttention(
        mha.embed_dim,
        mha.num_heads,
        dropout=mha.dropout,
        bias=mha.in_proj_bias is not None,
        kdim=mha.kdim,
        vdim=mha.vdim,
        batch_first=mha.batch_first,
        device=mha.out_proj.weight.device,
        dtype=mha.out_proj.weight.dtype,
    )
    with torch.no_grad():
        weights = w.chunk(3) if w is not None else (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)
        for proj, weight in zip((new.q_proj, new.k_proj, new.v_proj), weights):
            proj.weight.copy_(weight)
        if mha.in_proj_bias is not None:
            for proj, bias in zip((new.q_proj, new.k_proj, new.v_proj), mha.in_proj_bias.chunk(3)):
                proj.bias.copy_(bias)
        new.out_proj.weight.copy_(mha.out_proj.weight)
        if mha.out_proj.bias is not None:
            new.out_proj.bias.copy_(mha.out_proj.bias)
    return new.train(mha.training)
