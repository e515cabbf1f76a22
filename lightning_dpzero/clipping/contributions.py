"""Per-example gradients in factored form, and the three things the engine does with them.

Notation: n examples in the physical batch, T positions per example (sequence, or spatial after unfolding),
a gradient matrix of shape [P, D]. One *use* of a parameter in the forward pass contributes, for example i,

    DENSE:   G_i = sum_t left[i, t] (outer) right[i, t]    left [n, T, P], right [n, T, D]   (Linear, Conv)
    INDEX:   G_i = sum_t e_{left[i, t]} (outer) right[i, t] left [n, T] row ids (-1: none), right [n, T, D]
             (Embedding: a one-hot left factor over P = num_embeddings rows, never built)
    SAMPLE:  G_i = left[i]                                  left [n, *shape]                  (norms, biases)

A parameter's per-example gradient is the sum of its uses' G_i (a module called twice, tied weights), so its
squared norm is sum_u ||G_u,i||^2 + 2 sum_{u<v} <G_u,i, G_v,i>. Everything here computes those inner products
and the clipped sum sum_i c_i G_i without building a per-example gradient unless that is the cheaper way
(``instantiate``), in fp32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dpzero.config import NormMode

__all__ = ["Contribution", "Kind", "clipped_sum", "full_shape", "inner", "self_inner", "zero_rows"]


def full_shape(param: Tensor) -> torch.Size:
    """The parameter's logical shape, also when ZeRO-3 has partitioned it (then ``param.shape`` is (0,))."""
    return getattr(param, "ds_shape", param.shape)


class Kind(enum.Enum):
    DENSE = "dense"
    INDEX = "index"
    SAMPLE = "sample"


@dataclass(eq=False)
class Contribution:
    """One use of one parameter (or of a row block of it) in one forward pass, for every example.

    Args:
        param: the parameter's canonical name.
        kind: which factored form ``left``/``right`` hold (see the module docstring).
        left: DENSE [n, T, P]; INDEX [n, T] int64; SAMPLE [n, *shape].
        right: DENSE and INDEX [n, T, D]; SAMPLE ``None``.
        shape: the shape of the parameter block this contribution's [P, D] matrix (or SAMPLE tensor) reshapes to.
        num_rows: P for INDEX (the number of embedding rows).
        rows: the slice of the parameter's dim 0 this contribution covers (grouped convolutions); ``None``: all.
        to_param: maps the summed [P, D] matrix to ``shape`` (a reshape by default; a transpose for layouts
            stored the other way round).
    """

    param: str
    kind: Kind
    left: Tensor | None
    right: Tensor | None
    shape: torch.Size
    num_rows: int = 0
    rows: slice | None = None
    to_param: Callable[[Tensor], Tensor] | None = None
    instantiated: Tensor | None = field(default=None, repr=False)  # DENSE only: [n, P, D] fp32

    @property
    def num_examples(self) -> int:
        tensor = self.instantiated if self.instantiated is not None else self.left
        assert tensor is not None
        return tensor.shape[0]

    def matrix_shape(self) -> tuple[int, int] | None:
        """(P, D) of the gradient matrix, or ``None`` for SAMPLE."""
        if self.kind is Kind.SAMPLE:
            return None
        if self.instantiated is not None:
            return tuple(self.instantiated.shape[1:])  # type: ignore[return-value]
        assert self.right is not None and self.left is not None
        p = self.num_rows if self.kind is Kind.INDEX else self.left.shape[-1]
        return p, self.right.shape[-1]

    def choose_norm_mode(self, mode: NormMode) -> None:
        """For DENSE, build the per-example gradient now if that is the better way to its norm.

        FLOPs always favour instantiation: both ways end with n T P D multiply-adds for the clipped sum or for G_i,
        and the ghost norm adds n T^2 (P + D) for its Gram matrices. Memory decides: instantiation holds
        [n, P, D]; the ghost norm holds [n, T, T] twice. ``AUTO`` instantiates when P D is no larger than
        max(2 T^2, T (P + D)), i.e. than the Gram matrices or than the activations the layer keeps anyway
        (FastDP's rule is the first half: 2 T^2 > P D).
        """
        if self.kind is not Kind.DENSE or mode is NormMode.GHOST:
            return
        assert self.left is not None and self.right is not None
        t, p, d = self.left.shape[1], self.left.shape[2], self.right.shape[2]
        if t == 1 and mode is NormMode.AUTO:
            return  # ||a|| ||b|| and a rank-one clipped sum: cheaper than either
        if mode is NormMode.INSTANTIATE or p * d <= max(2 * t * t, t * (p + d)):
            self.instantiated = torch.einsum("ntp,ntd->npd", self.left.float(), self.right.float())
            self.left = self.right = None


def _f32(t: Tensor | None) -> Tensor:
    assert t is not None
    return t.float()


def _sq_norms(x: Tensor) -> Tensor:
    """Squared L2 norm of each example's slice: [n, ...] -> [n] (one fused pass)."""
    return torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1).square()


def self_inner(c: Contribution) -> Tensor:
    """||G_i||^2 for every example: shape [n], fp32."""
    if c.kind is Kind.SAMPLE:
        return _sq_norms(_f32(c.left))
    if c.instantiated is not None:
        return _sq_norms(c.instantiated)
    if c.kind is Kind.INDEX:
        return _index_self_inner(c)
    left, right = _f32(c.left), _f32(c.right)
    if left.shape[1] == 1:
        return _sq_norms(left) * _sq_norms(right)
    return (torch.bmm(left, left.transpose(1, 2)) * torch.bmm(right, right.transpose(1, 2))).sum((1, 2))


def _index_self_inner(c: Contribution) -> Tensor:
    """Embedding: rows of G_i are sums of output-gradient rows per distinct token; O(n T D), no T^2 term."""
    ids, right = c.left, _f32(c.right)
    assert ids is not None
    n, t = ids.shape
    valid = ids >= 0
    # One key per (example, token): the distinct keys are exactly the non-zero rows of the per-example gradients.
    keys = torch.arange(n, device=ids.device).unsqueeze(1) * c.num_rows + ids
    if c.num_rows <= 4 * t:
        # Small vocabulary (or positions): scatter straight into [n * V, D], cheaper than sorting keys.
        summed = torch.zeros(n * c.num_rows, right.shape[-1], device=right.device, dtype=right.dtype)
        summed.index_add_(0, keys[valid], right[valid])
        return summed.view(n, -1).square().sum(1)
    keys, rows = keys[valid], right[valid]
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.numel(), right.shape[-1], device=right.device, dtype=right.dtype)
    summed.index_add_(0, inverse, rows)
    out = torch.zeros(n, device=right.device, dtype=right.dtype)
    return out.index_add_(0, torch.div(unique, c.num_rows, rounding_mode="floor"), summed.square().sum(1))


def inner(a: Contribution, b: Contribution) -> Tensor:
    """<G_a,i, G_b,i> for every example, for two uses of the same parameter block: shape [n], fp32."""
    if a.kind is Kind.SAMPLE or b.kind is Kind.SAMPLE:
        return (_per_example(a) * _per_example(b)).flatten(1).sum(1)
    if a.matrix_shape() != b.matrix_shape():
        return (_per_example(a) * _per_example(b)).flatten(1).sum(1)
    if a.kind is Kind.INDEX and b.kind is Kind.DENSE:
        a, b = b, a
    if a.instantiated is not None and b.instantiated is not None:
        return (a.instantiated * b.instantiated).flatten(1).sum(1)
    if a.instantiated is not None:
        a, b = b, a  # a is factored from here on
    if b.instantiated is not None:
        # <sum_t l_t r_t^T, G> = sum_t l_t^T G r_t
        if a.kind is Kind.INDEX:
            rows = _gather_rows(b.instantiated, a.left)  # [n, T, D]
            return (rows * _f32(a.right)).sum((1, 2))
        return torch.einsum("ntp,npd,ntd->n", _f32(a.left), b.instantiated, _f32(a.right))
    right_gram = torch.bmm(_f32(a.right), _f32(b.right).transpose(1, 2))  # [n, Ta, Tb]
    if a.kind is Kind.DENSE and b.kind is Kind.DENSE:
        left_gram = torch.bmm(_f32(a.left), _f32(b.left).transpose(1, 2))
    elif a.kind is Kind.DENSE:  # b is INDEX: <l_s, e_{x_t}> = l_s[x_t]
        ids = b.left
        assert ids is not None
        left_gram = torch.gather(_f32(a.left), 2, ids.clamp(min=0).unsqueeze(1).expand(-1, a.left.shape[1], -1))
        left_gram = left_gram * (ids >= 0).unsqueeze(1)
    else:  # both INDEX
        ia, ib = a.left, b.left
        assert ia is not None and ib is not None
        left_gram = ((ia.unsqueeze(2) == ib.unsqueeze(1)) & (ia >= 0).unsqueeze(2)).float()
    return (left_gram * right_gram).sum((1, 2))


def _gather_rows(matrix: Tensor, ids: Tensor | None) -> Tensor:
    """matrix [n, P, D], ids [n, T] (-1: none) -> [n, T, D] with zero rows where ids < 0."""
    assert ids is not None
    rows = torch.gather(matrix, 1, ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, matrix.shape[-1]))
    return rows * (ids >= 0).unsqueeze(-1)


def _per_example(c: Contribution) -> Tensor:
    """The per-example gradient block, [n, *shape], fp32 (fallback for unusual parameter sharing)."""
    n = c.num_examples
    if c.kind is Kind.SAMPLE:
        return _f32(c.left)
    if c.instantiated is not None:
        matrices = c.instantiated
    elif c.kind is Kind.DENSE:
        matrices = torch.einsum("ntp,ntd->npd", _f32(c.left), _f32(c.right))
    else:
        ids, right = c.left, _f32(c.right)
        assert ids is not None
        matrices = torch.zeros(n, c.num_rows, right.shape[-1], device=right.device)
        valid = (ids >= 0).unsqueeze(-1)
        matrices.scatter_add_(1, ids.clamp(min=0).unsqueeze(-1).expand_as(right), right * valid)
    return torch.stack([_to_param(c, m) for m in matrices]) if n else matrices.new_zeros(0, *c.shape)


def _to_param(c: Contribution, matrix: Tensor) -> Tensor:
    return c.to_param(matrix) if c.to_param is not None else matrix.reshape(c.shape)


def clipped_sum(c: Contribution, factors: Tensor) -> Tensor:
    """sum_i factors[i] G_i, reshaped to the parameter block: fp32.

    Args:
        factors: per-example clip factors, shape [n], fp32; 0 for padding rows.
    """
    if c.kind is Kind.SAMPLE:
        return torch.einsum("n,n...->...", factors, _f32(c.left))
    if c.instantiated is not None:
        return _to_param(c, torch.einsum("n,npd->pd", factors, c.instantiated))
    right = _f32(c.right) * factors.view(-1, 1, 1)
    if c.kind is Kind.INDEX:
        ids = c.left
        assert ids is not None
        valid = ids >= 0
        out = torch.zeros(c.num_rows, right.shape[-1], device=right.device, dtype=right.dtype)
        return _to_param(c, out.index_add_(0, ids[valid], right[valid]))
    left = _f32(c.left)
    return _to_param(c, left.flatten(0, 1).T @ right.flatten(0, 1))


def zero_rows(c: Contribution, rows: Tensor) -> Contribution:
    """A copy of ``c`` whose examples ``rows`` ([n] bool) contribute exactly 0 (their values may be inf or NaN)."""

    def clean(t: Tensor | None) -> Tensor | None:
        if t is None or not t.is_floating_point():
            return t  # INDEX ids: the zeroed right factor already removes the rows
        keep = ~rows.view(-1, *([1] * (t.dim() - 1))).to(t.device)
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

    return dataclasses.replace(c, left=clean(c.left), right=clean(c.right), instantiated=clean(c.instantiated))
