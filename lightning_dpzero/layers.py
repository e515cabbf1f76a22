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
    (or [n, L, E] with ``batch_first``; [L, E] unbatched), as in torch; the projections always see examples first,
    which per-example clipping needs.
    """

    # Read by nn.TransformerEncoder(Layer) to choose their fused inference path, which needs a fused in_proj_weight:
    # these values keep them on the module path, through the projections below.
    in_proj_weight: None = None
    in_proj_bias: None = None
    bias_k: None = None
    bias_v: None = None
    add_zero_attn = False
    _qkv_same_embed_dim = False

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
            raise ValueError(
                "DPMultiheadAttention: add_bias_kv=True and add_zero_attn=True are not supported (their extra "
                "key/value rows have no per-example clipping rule); set them to False."
            )
        if embed_dim <= 0 or num_heads <= 0 or embed_dim % num_heads:
            raise ValueError(f"DPMultiheadAttention: embed_dim={embed_dim} must be divisible by num_heads={num_heads}.")
        kw = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = embed_dim, num_heads, dropout, batch_first
        self.kdim, self.vdim = kdim or embed_dim, vdim or embed_dim
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.k_proj = nn.Linear(self.kdim, embed_dim, bias=bias, **kw)
        self.v_proj = nn.Linear(self.vdim, embed_dim, bias=bias, **kw)
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
        """As ``nn.MultiheadAttention.forward``: returns (output, weights [n, L, S] averaged or [n, H, L, S]; or None).

        ``is_causal`` without ``attn_mask`` applies the causal mask (torch requires the mask too).
        """
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (x.unsqueeze(0) for x in (query, key, value))  # [1, L/S, E]
        elif not self.batch_first:
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))  # [L/S, n, E] -> [n, L/S, E]
        n, length, _ = query.shape
        h, d = self.num_heads, self.head_dim

        def heads(x: Tensor) -> Tensor:
            return x.view(n, -1, h, d).transpose(1, 2)  # [n, S, E] -> [n, H, S, D/H]

        q, k, v = heads(self.q_proj(query)), heads(self.k_proj(key)), heads(self.v_proj(value))
        mask = _additive_mask(attn_mask, key_padding_mask, n, h, length, k.shape[2], q, is_causal)
        dropout = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(d))) @ k.transpose(-2, -1)  # [n, H, L, S]
            if mask is not None:
                scores = scores + mask
            weights = F.dropout(scores.softmax(-1), dropout, self.training)  # torch returns the dropped weights
            out = weights @ v  # [n, H, L, D/H]
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
        out = self.out_proj(out.transpose(1, 2).reshape(n, length, self.embed_dim))  # [n, L, E]
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)  # [n, L, S]
        if unbatched:
            return out.squeeze(0), None if weights is None else weights.squeeze(0)
        return (out if self.batch_first else out.transpose(0, 1)), weights


def _additive_mask(
    attn_mask: Tensor | None,
    key_padding_mask: Tensor | None,
    n: int,
    h: int,
    length: int,
    source: int,
    like: Tensor,
    is_causal: bool,
) -> Tensor | None:
    """attn_mask ([L, S] or [n * H, L, S]) and key_padding_mask ([n, S]), bool (True: masked) or additive float,
    as one additive mask broadcastable to [n, H, L, S], -inf where attention is not allowed."""

    def additive(m: Tensor) -> Tensor:
        if m.dtype == torch.bool:
            return torch.zeros(m.shape, dtype=like.dtype, device=like.device).masked_fill(m, float("-inf"))
        return m.to(like.dtype)

    if attn_mask is None and is_causal:
        attn_mask = torch.ones(length, source, dtype=torch.bool, device=like.device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = additive(attn_mask)
        if mask.dim() == 3:
            mask = mask.view(n, h, length, source)  # torch's [n * H] is example-major
    if key_padding_mask is not None:
        padding = additive(key_padding_mask).view(n, 1, 1, source)
        mask = padding if mask is None else mask + padding
    return mask


def replace_multihead_attention(module: nn.Module) -> nn.Module:
    """Swap every ``nn.MultiheadAttention`` inside ``module`` for a ``DPMultiheadAttention`` with the same weights,
    training mode and ``requires_grad`` flags; returns ``module`` (the replacement if ``module`` is one itself).

    Exact type only, like the clipping rules: a subclass may compute something else, so it is left in place (and
    refused by the clipping engine if trainable).
    """
    if type(module) is nn.MultiheadAttention:
        return _converted(module)
    for name, child in list(module.named_children()):
        if type(child) is nn.MultiheadAttention:
            setattr(module, name, _converted(child))
        else:
            replace_multihead_attention(child)
    if isinstance(module, nn.TransformerEncoder):
        module.use_nested_tensor = False  # its nested-tensor inference path calls fused kernels on in_proj_weight
    return module


def _converted(mha: nn.MultiheadAttention) -> DPMultiheadAttention:
    if mha.bias_k is not None or mha.add_zero_attn:
        raise ValueError(
            "replace_multihead_attention: an nn.MultiheadAttention with add_bias_kv=True or add_zero_attn=True has "
            "no DP drop-in; rebuild it without them."
        )
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
    projections = (new.q_proj, new.k_proj, new.v_proj)
    if mha.in_proj_weight is not None:  # kdim == vdim == embed_dim: one fused [3E, E] weight, rows q, k, v
        weights = [(w, mha.in_proj_weight.requires_grad) for w in mha.in_proj_weight.chunk(3)]
    else:
        weights = [(w, w.requires_grad) for w in (mha.q_proj_weight, mha.k_proj_weight, mha.v_proj_weight)]
    pairs = [(proj.weight, *wr) for proj, wr in zip(projections, weights)]
    if mha.in_proj_bias is not None:
        flag = mha.in_proj_bias.requires_grad
        pairs += [(proj.bias, b, flag) for proj, b in zip(projections, mha.in_proj_bias.chunk(3))]
    pairs.append((new.out_proj.weight, mha.out_proj.weight, mha.out_proj.weight.requires_grad))
    if mha.out_proj.bias is not None:
        pairs.append((new.out_proj.bias, mha.out_proj.bias, mha.out_proj.bias.requires_grad))
    with torch.no_grad():
        for target, source, requires_grad in pairs:
            target.copy_(source).requires_grad_(requires_grad)
    return new.train(mha.training)
