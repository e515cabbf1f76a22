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
(``instantiate``), in fp32 whatever the compute dtype (a bf16 layer's instantiated gradients are stored in bf16, the
precision of its own weight gradient under autocast; their norms and sums are taken in fp32 from those values).

Privacy: a Gram-matrix ("ghost") norm is a sum of terms of both signs, which fp32 can cancel down to nothing while
the gradient that is summed stays large (opposite inputs at two positions). So every squared norm comes with its
*mass*, the sum of the absolute values of its terms; its fp32 error is below ~1e-7 x mass (measured), and the engine
recomputes exactly (float64, from the instantiated block) every one whose mass exceeds ``CANCELLATION_LIMIT`` times
its value, where that error could exceed ~6e-6 of the squared norm (3e-6 of the norm).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightning_dpzero.config import NormMode

__all__ = [
    "CANCELLATION_LIMIT",
    "Contribution",
    "Kind",
    "VectorBlocks",
    "clipped_sum",
    "exact_per_example",
    "full_shape",
    "inner",
    "merge",
    "self_inner",
    "zero_rows",
]


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
        build_right: DENSE only, with ``right=None``: builds ``right`` when a factored form is needed (a
            convolution's patches), so that it is never built when ``instantiate`` is used instead; called with a
            slice of the examples, builds their rows only.
        instantiate: DENSE only: a faster way than ``einsum(left, right)`` to the per-example gradients, used when
            the norm mode instantiates (a convolution's weight gradient with one group per example): [n, P, D'] fp32,
            laid out as the parameter block (``shape`` flattened after its first dim), not as ``left``/``right``'s
            [P, D] matrices: ``to_param`` no longer applies to them and is dropped. With ``instantiate_rows``, it is
            called with a slice of the examples and returns their blocks only.
        instantiate_rows: the most examples ``instantiate`` takes at once by default (its transient memory and its
            speed: a grouped weight-gradient convolution of a whole batch can be several times slower than of a
            few examples at a time); ``None``: it takes no argument and makes every example's block at once.
        instantiate_bytes: bytes per example that ``instantiate`` allocates while it runs, besides the block.
        dims: DENSE with ``right=None``: (T, P, D).
        weighted_sum: DENSE only: a faster way than the factored matmul to sum_i f_i G_i for factors f [n], fp32
            and already of ``shape`` (a convolution's weight gradient with each example's output gradient scaled by
            f_i: no patches).
    """

    param: str
    kind: Kind
    left: Tensor | None
    right: Tensor | None
    shape: torch.Size
    num_rows: int = 0
    rows: slice | None = None
    to_param: Callable[[Tensor], Tensor] | None = None
    instantiated: Tensor | None = field(default=None, repr=False)  # DENSE only: [n, P, D] fp32 (bf16 for bf16 layers)
    build_right: Callable[..., Tensor] | None = field(default=None, repr=False)
    instantiate: Callable[..., Tensor] | None = field(default=None, repr=False)
    dims: tuple[int, int, int] | None = None
    weighted_sum: Callable[[Tensor], Tensor] | None = field(default=None, repr=False)
    instantiate_rows: int | None = None
    instantiate_bytes: int = 0
    deferred: bool = False  # DENSE under NormMode.AUTO: instantiated or not when the engine settles it
    approved: bool = False  # deferred only for the moment: instantiated when settled

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

    def choose_norm_mode(self, mode: NormMode, room: int | None = None) -> None:
        """For DENSE, build the per-example gradient now if that is the better way to its norm.

        FLOPs always favour instantiation: both ways end with n T P D multiply-adds for the clipped sum or for G_i,
        and the ghost norm adds n T^2 (P + D) for its Gram matrices. Memory decides: instantiation holds
        [n, P, D]; the ghost norm holds [n, T, T] twice. ``AUTO`` instantiates now when P D is no larger than
        max(2 T^2, T (P + D)), i.e. than the Gram matrices or than the activations the layer keeps anyway
        (FastDP's rule is the first half: 2 T^2 > P D). Otherwise it *defers* the choice (``deferred``): the
        engine settles it when the clip factors are next needed (``settle``), instantiating where the block fits
        under the step's peak of memory so far, the ghost norm elsewhere. A block the first rule takes is
        deferred too (``approved``: always instantiated when settled) where it exceeds ``room``, the bytes the
        engine says it could take now without raising the step's peak (``None``: not followed).
        """
        if self.kind is not Kind.DENSE:
            return
        t, p, d = self._dims()
        if mode is NormMode.AUTO and t > 1 and p * d > max(2 * t * t, t * (p + d)):
            self.deferred = True
            return
        if mode is NormMode.AUTO and t > 1 and room is not None:
            block, per_example = self.block_bytes()
            if block + per_example * min(self.num_examples, self.rows_at_once()) > room:
                self.deferred = self.approved = True
                return
        # t == 1: ||a|| ||b|| and a rank-one clipped sum are cheaper than either
        self.settle(mode is NormMode.INSTANTIATE or (mode is NormMode.AUTO and t > 1))

    def _dims(self) -> tuple[int, int, int]:
        """(T, P, D) of a DENSE contribution."""
        assert self.left is not None
        if self.right is None:
            assert self.dims is not None and self.build_right is not None
            return self.dims
        return self.left.shape[1], self.left.shape[2], self.right.shape[2]

    def settle(self, instantiate: bool, rows_at_once: int | None = None) -> None:
        """DENSE: build the per-example gradient (``instantiate``), or the factors the ghost norm needs.

        Args:
            rows_at_once: where the block is made with memory of its own (``block_bytes``: a convolution's patches, a
                grouped weight-gradient convolution's buffers), the most examples made at once (default:
                ``rows_at_once()``).
        """
        self.deferred = False
        if instantiate and self.instantiate is not None:
            n = self.num_examples
            step = _even_step(n, min(rows_at_once or n, self.rows_at_once()))
            if self.instantiate_rows is None:
                self.instantiated = self.instantiate()
            elif step >= n:
                self.instantiated = self.instantiate(slice(None))
            else:
                first = self.instantiate(slice(0, step))
                self.instantiated = first.new_empty(n, *first.shape[1:])
                self.instantiated[:step] = first
                del first
                for i in range(step, n, step):
                    self.instantiated[i : i + step] = self.instantiate(slice(i, i + step))
            self.to_param = None  # in the parameter's own layout: a reshape to ``shape``
        elif instantiate:
            assert self.left is not None
            # [n, P, D], in bf16 where the layer's output gradient is bf16 (under bf16 autocast the weight gradient is
            # a bf16 matmul of the same factors, the input cast as autocast casts it), fp32 otherwise. Its norm and
            # its clipped sum are both taken, in fp32, from these stored values: the clip bounds what is summed.
            dtype = torch.bfloat16 if self.left.dtype == torch.bfloat16 else torch.float32
            left = self.left.to(dtype).transpose(1, 2)
            if self.right is not None:
                self.instantiated = torch.bmm(left, self.right.to(dtype))
            else:  # built a few examples at a time (a convolution's patches outgrow its block)
                n = left.shape[0]
                step = _even_step(n, min(rows_at_once or n, self.rows_at_once()))
                self.instantiated = torch.empty(n, left.shape[1], self._dims()[2], dtype=dtype, device=left.device)
                for i in range(0, n, step):
                    rows = slice(i, i + step)
                    torch.bmm(left[rows], self._build_right(rows).to(dtype), out=self.instantiated[rows])
        elif self.right is None:
            self.right = self._build_right()
        if instantiate:  # the block replaces the factors, and any way to a clipped sum from them
            self.left = self.right = self.weighted_sum = None
        if instantiate or self.weighted_sum is None:
            self.build_right = None  # (kept otherwise: ``spare`` may drop ``right`` and ``factored`` rebuild it)
        self.instantiate = None

    def rows_at_once(self) -> int:
        """The most examples whose block is made at once by default: ``instantiate_rows`` for a block with its own
        way, else as many as ``_RIGHT_CHUNK`` elements of ``right`` hold when it is built only to instantiate."""
        if self.instantiate is not None:
            return self.instantiate_rows or self.num_examples
        t, _, d = self._dims()
        return max(1, _RIGHT_CHUNK // (t * d))

    def block_bytes(self) -> tuple[int, int]:
        """A DENSE contribution: (bytes of its instantiated block, bytes per example of what is built only to form
        it: a convolution's patches, or what its own way allocates (``instantiate_bytes``); 0 where ``right`` is at
        hand)."""
        t, p, d = self._dims()
        assert self.left is not None
        size = 2 if self.left.dtype == torch.bfloat16 else 4
        if self.instantiate is not None:
            transient = self.instantiate_bytes
        else:
            transient = t * d * 4 if self.right is None else 0
        return self.left.shape[0] * p * d * size, transient

    def ghost_cost(self) -> float:
        """A deferred contribution: the multiply-adds its instantiation saves per byte of block (the Gram matrices'
        n T^2 (P + D) over n P D)."""
        t, p, d = self._dims()
        return t * t * (p + d) / (p * d)

    def _build_right(self, rows: slice | None = None) -> Tensor:
        assert self.build_right is not None
        return self.build_right() if rows is None else self.build_right(rows)

    def spare(self) -> None:
        """Once its norm is taken: drop ``right`` if only the norm needed it (the clipped sum is ``weighted_sum``'s,
        and ``build_right`` rebuilds it should a cross term, an exact recomputation or a dropped example need it).
        A convolution's patches then live for one layer's backward instead of the whole step's."""
        if self.weighted_sum is not None and self.build_right is not None:
            self.right = None

    def factored(self) -> Contribution:
        """This contribution with ``right`` rebuilt if ``spare`` dropped it."""
        if self.right is None and self.build_right is not None and self.instantiated is None:
            self.right = self._build_right()
        return self


def _even_step(n: int, most: int) -> int:
    """The step that splits n examples into as few chunks of at most ``most`` as possible, all of one size but the
    last (10 + 10 + 10 + 2 becomes 8 + 8 + 8 + 8)."""
    chunks = -(-n // max(1, most))
    return -(-n // max(1, chunks))


def _f32(t: Tensor | None) -> Tensor:
    assert t is not None
    return t if t.dtype is torch.float32 else t.float()  # (no dispatch where it is fp32 already: ~2 us a call)


# ------------------------------------------------------------------------------------------- squared norms
# Every function below returns (value, mass), both [n] float64: ``value`` is the quantity (a squared norm or an
# inner product), ``mass`` the sum of the absolute values of the terms it was summed from. mass / value measures
# cancellation: fp32 rounding errors scale with the mass, not the value, so the engine recomputes an example's
# squared norm exactly (float64, from its instantiated gradient) where the ratio is large (``CANCELLATION_LIMIT``).
# Gram matrices are formed from rows scaled by powers of two (exact) to max-abs 1, so that no product of four
# activations or gradients can overflow or underflow fp32; the scales are put back in float64.
# A function returns the same tensor as value and mass only where every term is non-negative (a sum of squares, a
# product of two): the engine then skips the cancellation test for it (ClippingEngine._finalize), which such a value
# cannot fail. Anything summed from terms of both signs must return a mass of its own.

CANCELLATION_LIMIT = 64.0  # mass / value above which a squared norm is recomputed exactly (float64)


def _sq_norms(x: Tensor) -> tuple[Tensor, Tensor]:
    """||x_i||^2 for x [n, ...]: no cancellation possible (value = mass). An overflow of the fp32 squares shows as a
    non-finite value, which the engine recomputes exactly; an underflow only affects norms far below any C."""
    rows = x if x.dim() == 2 else x.reshape(x.shape[0], -1)
    if rows.numel() <= _SMALL and rows.dtype is torch.float32:  # two ops, not three (a norm layer's, a bias's)
        out = (rows * rows).sum(1, dtype=torch.float64)
        return out, out
    if rows.dtype in (torch.float32, torch.float64) or rows.numel() <= _UPCAST_CHUNK:
        out = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
    else:  # upcast (in vector_norm) a few rows at a time: an fp32 copy of a whole bf16 block would be its peak
        step = max(1, _UPCAST_CHUNK // rows.shape[1])
        out = torch.cat([torch.linalg.vector_norm(rows[i : i + step], dim=1, dtype=torch.float32)
                         for i in range(0, rows.shape[0], step)])  # fmt: skip
    out = out.double().square()
    return out, out


_UPCAST_CHUNK = 1 << 18  # elements of a low-precision block upcast to fp32 at once
_SMALL = 1 << 14  # elements of an fp32 block whose squares _sq_norms forms whole
_RIGHT_CHUNK = 1 << 24  # the most elements of a right factor built at once to instantiate a block


def _row_scaled(x: Tensor) -> tuple[Tensor, Tensor]:
    """x [n, T, F] -> (x with each row divided by a power of two to max-abs in [0.5, 1), fp32; exponents [n, T])."""
    x = x.float()
    amax = x.abs().amax(-1)  # [n, T]
    _, exponent = torch.frexp(amax)  # amax = m 2^e, m in [0.5, 1); zero rows: e = 0
    scaled = torch.ldexp(x, -exponent.unsqueeze(-1).to(x.dtype))
    return scaled, exponent


def _scaled_gram_sum(
    ga: Tensor, gb: Tensor, ea: tuple[Tensor, Tensor], eb: tuple[Tensor, Tensor]
) -> tuple[Tensor, Tensor]:
    """sum_{s,t} ga[s,t] gb[s,t] 2^(ea0[s] + eb0[s] + ea1[t] + eb1[t]) and the same over |terms|, float64 [n].

    ga, gb: [n, Ts, Tt] Gram matrices of scaled rows; ea = (row exponents of the left factors of the two uses),
    eb = (the same for the right factors). The per-example largest exponent is factored out exactly.
    """
    ws, wt = ea[0] + eb[0], ea[1] + eb[1]  # [n, Ts], [n, Tt] int
    top_s, top_t = ws.amax(1, keepdim=True), wt.amax(1, keepdim=True)
    scale_s = torch.ldexp(torch.ones_like(ga[:, :, 0]), (ws - top_s).to(ga.dtype))  # <= 1; tiny rows underflow to 0
    scale_t = torch.ldexp(torch.ones_like(ga[:, 0, :]), (wt - top_t).to(ga.dtype))
    terms = ga * gb * scale_s.unsqueeze(2) * scale_t.unsqueeze(1)  # [n, Ts, Tt] fp32, bounded by D P
    one = torch.ones(ga.shape[0], dtype=torch.float64, device=ga.device)
    scale = torch.ldexp(one, (top_s + top_t).squeeze(1).double())
    return terms.sum((1, 2)).double() * scale, terms.abs().sum((1, 2)).double() * scale


def _gram_terms(left: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """sum_{s,t} left[s,t] right[s,t] and sum_{s,t} |left[s,t] right[s,t]|, [n] float64 (``left`` is reused)."""
    terms = left.mul_(right)
    return terms.sum((1, 2)).double(), terms.abs_().sum((1, 2)).double()


def _in_safe_range(*factors: Tensor) -> bool:
    """Whether Gram sums of these factors can be formed in plain fp32: for each factor x [n, T, F], the largest
    possible Gram entry F max|x|^2 is below 2^60 (the products of two entries stay below 2^120) and max|x|^2 is
    above 2^-60. A row whose own Gram entries underflow is then below 2^-33 times the largest row of any factor,
    so the gradient terms it carries are negligible; anything that still overflows shows as a non-finite value."""
    for x in factors:
        features = x.shape[-1]
        if not x.is_contiguous() and x.dim() >= 2 and x.mT.is_contiguous():
            x = x.mT  # the same values in memory order (a convolution's patches): aminmax would copy them first
        low, high = torch.aminmax(x)  # one fused pass (20x faster than vector_norm(ord=inf) on CPU)
        top2 = max(-float(low), float(high)) ** 2
        if not 2.0**-60 < top2 < 2.0**60 / max(1, features):
            return False
    return True


def _dense_gram(la: Tensor, ra: Tensor, lb: Tensor, rb: Tensor) -> tuple[Tensor, Tensor]:
    """sum_{s,t} <la_s, lb_t> <ra_s, rb_t> and its mass: the inner product of two DENSE per-example gradients."""
    same = lb is la and rb is ra
    if _in_safe_range(la, ra) and (same or _in_safe_range(lb, rb)):  # ordinary values: no rescaling needed
        left = torch.bmm(_f32(la), _f32(lb).transpose(1, 2))  # [n, Ta, Tb]
        return _gram_terms(left, torch.bmm(_f32(ra), _f32(rb).transpose(1, 2)))
    (la, ela), (ra, era) = _row_scaled(la), _row_scaled(ra)
    if same:
        lb, elb, rb, erb = la, ela, ra, era
    else:
        (lb, elb), (rb, erb) = _row_scaled(lb), _row_scaled(rb)
    left = torch.bmm(la, lb.transpose(1, 2))  # [n, Ta, Tb]
    right = torch.bmm(ra, rb.transpose(1, 2))
    return _scaled_gram_sum(left, right, (ela, elb), (era, erb))


def self_inner(c: Contribution) -> tuple[Tensor, Tensor]:
    """||G_i||^2 for every example, and its mass: two tensors of shape [n], float64."""
    if c.kind is Kind.SAMPLE:
        return _sq_norms(_f32(c.left))
    if c.instantiated is not None:
        return _sq_norms(c.instantiated)
    if c.kind is Kind.INDEX:
        return _index_self_inner(c)
    assert c.left is not None and c.right is not None
    if c.left.shape[1] == 1:  # one position: ||b a^T||^2 = ||a||^2 ||b||^2, no sum that could cancel
        value = _sq_norms(c.left)[0] * _sq_norms(c.right)[0]
        return value, value
    return _dense_gram(c.left, c.right, c.left, c.right)


def _index_self_inner(c: Contribution) -> tuple[Tensor, Tensor]:
    """Embedding: rows of G_i are sums of output-gradient rows per distinct token; O(n T D), no T^2 term. The mass
    is sum over (example, token) of (sum of ||b_t|| over the positions of that token)^2: opposite gradients at two
    positions of one token cancel in G_i, and the mass bounds what fp32 rounding can do to that sum."""
    ids, right = c.left, _f32(c.right)
    assert ids is not None
    n, t = ids.shape
    shared = _shared_ids(ids) if t <= c.num_rows else None
    if shared is not None and _distinct(shared):  # each position its own row of G_i: ||G_i||^2 = ||b_i||^2, exactly
        value = _sq_norms(right)[0]
        return value, value
    # One key per (example, token): the distinct keys are exactly the non-zero rows of the per-example gradients.
    keys, rows = _valid_rows(torch.arange(n, device=ids.device).unsqueeze(1) * c.num_rows + ids, ids, right)
    norms = torch.linalg.vector_norm(rows, dim=1).double()  # [m]
    if c.num_rows <= 4 * t:
        # Small vocabulary (or positions): scatter straight into [n * V, D], cheaper than sorting keys.
        summed = torch.zeros(n * c.num_rows, right.shape[-1], device=right.device, dtype=right.dtype)
        summed.index_add_(0, keys, rows)
        magnitude = torch.zeros(n * c.num_rows, device=right.device, dtype=torch.float64)
        magnitude.index_add_(0, keys, norms)
        return _sq_norms(summed.view(n, -1))[0], magnitude.view(n, -1).square().sum(1)
    unique, inverse = torch.unique(keys, return_inverse=True)
    summed = torch.zeros(unique.numel(), right.shape[-1], device=right.device, dtype=right.dtype)
    summed.index_add_(0, inverse, rows)
    magnitude = torch.zeros(unique.numel(), device=right.device, dtype=torch.float64).index_add_(0, inverse, norms)
    owner = torch.div(unique, c.num_rows, rounding_mode="floor")
    value = torch.zeros(n, device=right.device, dtype=torch.float64)
    value.index_add_(0, owner, torch.linalg.vector_norm(summed, dim=1).double().square())
    mass = torch.zeros(n, device=right.device, dtype=torch.float64).index_add_(0, owner, magnitude.square())
    return value, mass


def _shared_ids(ids: Tensor) -> Tensor | None:
    """The one row [T] of ids that every example has (positions: expanded from a batch of one, stride 0, or given
    per example alike), or ``None`` (token ids, which differ: one comparison pass, no sort)."""
    if not len(ids):
        return None
    if ids.stride(0) == 0 or bool((ids == ids[:1]).all()):
        return ids[0]
    return None


def _distinct(row: Tensor) -> bool:
    """Whether the ids [T] are distinct and none is -1 (padding): then row t of G_i is b_t itself."""
    ordered = row.sort().values
    return bool((ordered[:1] >= 0).all() and (ordered[1:] != ordered[:-1]).all())


def _valid_rows(keys: Tensor, ids: Tensor, right: Tensor) -> tuple[Tensor, Tensor]:
    """The entries of ``keys`` [n, T] and the rows of ``right`` [n, T, D] at the positions whose id is not -1 (an
    embedding's padding index): [m] and [m, D]. Without padding (the usual case), views of all of them."""
    valid = ids >= 0
    if bool(valid.all()):
        return keys.reshape(-1), right.reshape(-1, right.shape[-1])
    return keys[valid], right[valid]


def inner(a: Contribution, b: Contribution) -> tuple[Tensor, Tensor]:
    """<G_a,i, G_b,i> for every example, for two uses of the same parameter block, and its mass: [n], float64."""
    a, b = a.factored(), b.factored()
    if (
        a.kind is Kind.SAMPLE
        or b.kind is Kind.SAMPLE
        or a.matrix_shape() != b.matrix_shape()
        or a.to_param is not b.to_param  # matrices laid out differently (a transposed weight, a convolution's)
    ):
        return _elementwise_inner(_per_example(a), _per_example(b))
    if a.kind is Kind.INDEX and b.kind is Kind.DENSE:
        a, b = b, a
    if a.instantiated is not None and b.instantiated is not None:
        return _elementwise_inner(a.instantiated, b.instantiated)
    if a.instantiated is not None:
        a, b = b, a  # a is factored from here on
    if b.instantiated is not None:
        # <sum_t l_t r_t^T, G> = sum_t l_t^T G r_t
        if a.kind is Kind.INDEX:
            rows = _gather_rows(b.instantiated, a.left)  # [n, T, D]
            return _elementwise_inner(rows, _f32(a.right))
        left, right, matrices = _f32(a.left), _f32(a.right), _f32(b.instantiated)
        value = torch.einsum("ntp,npd,ntd->n", left, matrices, right)
        mass = torch.einsum("ntp,npd,ntd->n", left.abs(), matrices.abs(), right.abs())
        return value.double(), mass.double()
    if a.kind is Kind.DENSE and b.kind is Kind.DENSE:
        assert a.left is not None and a.right is not None and b.left is not None and b.right is not None
        return _dense_gram(a.left, a.right, b.left, b.right)
    assert a.left is not None and a.right is not None and b.left is not None and b.right is not None
    if a.left.shape[1] * b.left.shape[1] >= b.num_rows * b.right.shape[-1]:
        # The Gram matrices [n, Ta, Tb] would outgrow the gradients [n, V, D] themselves (T5's relative bias: T^2
        # positions, 32 buckets): their inner product, from the gradients, is cheaper.
        return _elementwise_inner(_per_example(a), _per_example(b))
    ids = b.left  # b is INDEX; a is DENSE (<l_s, e_{x_t}> = l_s[x_t]) or INDEX (1 where the tokens agree)
    dense = [a.left] if a.kind is Kind.DENSE else []
    safe = _in_safe_range(*dense, a.right, b.right)
    (ra, era), (rb, erb) = ((a.right, None), (b.right, None)) if safe else (_row_scaled(a.right), _row_scaled(b.right))
    right_gram = torch.bmm(_f32(ra), _f32(rb).transpose(1, 2))  # [n, Ta, Tb]
    if a.kind is Kind.DENSE:
        la, ela = (a.left, None) if safe else _row_scaled(a.left)
        left_gram = torch.gather(_f32(la), 2, ids.clamp(min=0).unsqueeze(1).expand(-1, la.shape[1], -1))
        left_gram = left_gram * (ids >= 0).unsqueeze(1)
    else:
        ela = torch.zeros_like(a.left)
        left_gram = ((a.left.unsqueeze(2) == ids.unsqueeze(1)) & (a.left >= 0).unsqueeze(2)).float()
    if safe:
        return _gram_terms(left_gram, right_gram)
    assert ela is not None and era is not None and erb is not None
    return _scaled_gram_sum(left_gram, right_gram, (ela, torch.zeros_like(ids)), (era, erb))


def merge(a: Contribution, b: Contribution) -> Contribution | None:
    """Two uses of one parameter block as one contribution holding their summed per-example gradient, where that is
    cheaper than keeping both and their cross term: one of them instantiated in fp32 and the other instantiated in
    the same layout or an embedding's (INDEX) rows (a tied head and embedding: one block, one norm, one clipped sum,
    no cross term); or both per-example gradients (SAMPLE) of one shape. ``None`` where they are not merged.

    The merged contribution is ``a`` or ``b`` (the instantiated one; its block gains the other's gradient in place).
    Its squared norm is then taken from the summed block itself: a sum of squares, with no cancellation to guard.
    """
    if a.kind is Kind.SAMPLE and b.kind is Kind.SAMPLE:
        if a.left is None or b.left is None or a.left.shape != b.left.shape:
            return None
        a.left = _f32(a.left) + _f32(b.left)  # out of place: a rule's left may be a view of its output gradient
        return a
    if a.instantiated is None:
        a, b = b, a
    block = a.instantiated
    if (
        block is None
        or block.dtype != torch.float32
        or not block.is_contiguous()
        or a.matrix_shape() != b.matrix_shape()
        or a.to_param is not b.to_param  # laid out differently (a transposed weight, a convolution's)
    ):
        return None
    if b.instantiated is not None:
        block.add_(b.instantiated)
        return a
    if b.kind is not Kind.INDEX or b.right is None or b.left is None:
        return None
    n, p, d = block.shape
    ids = b.left
    keys = torch.arange(n, device=ids.device).unsqueeze(1) * p + ids  # row of the [n P, D] view per position
    block.view(n * p, d).index_add_(0, *_valid_rows(keys, ids, b.right.to(block.dtype)))
    return a


def _elementwise_inner(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """sum over all but dim 0 of x * y, and of |x * y|: [n] float64 (an fp32 overflow shows as non-finite)."""
    product = x.reshape(x.shape[0], -1).float() * y.reshape(y.shape[0], -1).float()
    return product.sum(1).double(), product.abs_().sum(1).double()


def _gather_rows(matrix: Tensor, ids: Tensor | None) -> Tensor:
    """matrix [n, P, D], ids [n, T] (-1: none) -> [n, T, D] with zero rows where ids < 0."""
    assert ids is not None
    rows = torch.gather(matrix, 1, ids.clamp(min=0).unsqueeze(-1).expand(-1, -1, matrix.shape[-1]))
    return rows * (ids >= 0).unsqueeze(-1)


def _per_example(c: Contribution, rows: Tensor | None = None, dtype: torch.dtype = torch.float32) -> Tensor:
    """The per-example gradient block [n, *shape] (or of the examples ``rows`` only), in ``dtype``."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    c = c.factored()
    if c.kind is Kind.SAMPLE:
        assert c.left is not None
        return pick(c.left).to(dtype)
    if c.instantiated is not None:
        matrices = pick(c.instantiated).to(dtype)
    elif c.kind is Kind.DENSE:
        assert c.left is not None and c.right is not None
        matrices = torch.einsum("ntp,ntd->npd", pick(c.left).to(dtype), pick(c.right).to(dtype))
    else:
        assert c.left is not None and c.right is not None
        ids, right = pick(c.left), pick(c.right).to(dtype)
        matrices = torch.zeros(ids.shape[0], c.num_rows, right.shape[-1], device=right.device, dtype=dtype)
        valid = (ids >= 0).unsqueeze(-1)
        matrices.scatter_add_(1, ids.clamp(min=0).unsqueeze(-1).expand_as(right), right * valid)
    if not len(matrices):
        return matrices.new_zeros(0, *c.shape)
    return torch.stack([_to_param(c, m) for m in matrices])


def exact_per_example(contributions: list[Contribution], rows: Tensor) -> Tensor:
    """The per-example gradient block of the examples ``rows`` ([k] indices), summed over the block's uses, in
    float64 from the recorded factors: the exact value the fp32 factored computations approximate. [k, *shape]."""
    total = _per_example(contributions[0], rows, torch.float64)
    for c in contributions[1:]:
        total = total + _per_example(c, rows, torch.float64)
    return total


def _to_param(c: Contribution, matrix: Tensor) -> Tensor:
    if c.to_param is not None:
        return c.to_param(matrix)
    return matrix if matrix.shape == c.shape else matrix.reshape(c.shape)


def clipped_sum(c: Contribution, factors: Tensor) -> Tensor:
    """sum_i factors[i] G_i, reshaped to the parameter block: fp32.

    Args:
        factors: per-example clip factors, shape [n], fp32; 0 for padding rows.
    """
    if c.kind is Kind.SAMPLE:
        assert c.left is not None
        summed = torch.mv(_matrix(c.left).t(), factors)  # [n, *shape] -> [prod(shape)]
        return summed if c.left.dim() == 2 else summed.view(c.left.shape[1:])
    if c.instantiated is not None:  # [n] @ [n, P * D]: a matrix-vector product (einsum adds ~10 us per call)
        n, p, d = c.instantiated.shape
        rows = c.instantiated.reshape(n, p * d)
        if rows.dtype == torch.float32 or rows.numel() <= _UPCAST_CHUNK:
            summed = torch.mv(_f32(rows).t(), factors)
            return summed.view(c.shape) if c.to_param is None else c.to_param(summed.view(p, d))
        # a low-precision block: upcast a few columns at a time (an fp32 copy of the whole block would be its peak)
        step = max(1, _UPCAST_CHUNK // n)
        summed = torch.cat([factors @ rows[:, j : j + step].float() for j in range(0, p * d, step)])
        return _to_param(c, summed.view(p, d))
    if c.weighted_sum is not None:
        return c.weighted_sum(factors)
    c = c.factored()
    shared = _shared_ids(c.left) if c.kind is Kind.INDEX and c.left is not None and c.left.dim() == 2 else None
    if shared is not None:  # one row of ids for every example (positions): sum_i f_i b_i, then scatter T rows
        right = _f32(c.right)
        n, t, d = right.shape
        rows = (factors @ right.reshape(n, t * d)).view(t, d)
        out = torch.zeros(c.num_rows, d, device=rows.device, dtype=rows.dtype)
        valid = shared >= 0
        if not bool(valid.all()):
            shared, rows = shared[valid], rows[valid]
        return _to_param(c, out.index_add_(0, shared, rows))
    right = _f32(c.right) * factors.view(-1, 1, 1)
    if c.kind is Kind.INDEX:
        ids = c.left
        assert ids is not None
        out = torch.zeros(c.num_rows, right.shape[-1], device=right.device, dtype=right.dtype)
        return _to_param(c, out.index_add_(0, *_valid_rows(ids, ids, right)))
    left = _f32(c.left)
    return _to_param(c, left.flatten(0, 1).T @ right.flatten(0, 1))


class VectorBlocks:
    """Blocks each held as one per-example vector (SAMPLE contributions alone in their block: norm layers', biases'),
    laid side by side in one [n, total] fp32 matrix: their squared norms by one segmented sum, their clipped sums by
    one matrix-vector product per clipping group, in place of a few operators per block. The norm and the clipped
    sum of a block are both taken from its columns of that matrix.

    Args:
        contributions: block key -> its SAMPLE contribution, ordered so that each group's blocks are adjacent.
        groups: block key -> its clipping group.
    """

    def __init__(
        self, contributions: dict[tuple[str, int | None], Contribution], groups: dict[tuple[str, int | None], int]
    ) -> None:
        vectors = [_matrix(c.left) for c in contributions.values()]
        self.matrix = vectors[0] if len(vectors) == 1 else torch.cat(vectors, 1)  # [n, total]
        self.widths = [v.shape[1] for v in vectors]
        if len(vectors) > 1:  # each contribution now reads its columns of the matrix: the vectors are not held twice
            start = 0
            for c, width in zip(contributions.values(), self.widths):
                assert c.left is not None
                c.left = self.matrix[:, start : start + width].view(c.left.shape[0], *c.left.shape[1:])
                start += width
        self._columns: dict[tuple[str, int | None], tuple[int, int, torch.Size]] = {}  # key -> (start, end, shape)
        self._groups: dict[int, tuple[int, int]] = {}  # group -> its columns (start, end)
        start = 0
        for (key, c), width in zip(contributions.items(), self.widths):
            self._columns[key] = (start, start + width, c.shape)
            first, _ = self._groups.get(groups[key], (start, 0))
            self._groups[groups[key]] = (first, start + width)
            start += width
        self._sums: dict[tuple[str, int | None], Tensor] = {}  # key -> its clipped sum, once its group's is taken

    def squared_norms(self) -> list[Tensor]:
        """Each block's squared norm per example, [n] float64 (fp32 sums of squares; an overflow shows as a
        non-finite value, which the engine recomputes exactly)."""
        n = self.matrix.shape[0]
        if not n:
            return [self.matrix.new_zeros(0, dtype=torch.float64) for _ in self.widths]
        if len(self.widths) == 1:
            return [_sq_norms(self.matrix)[0]]
        lengths = torch.tensor(self.widths, device=self.matrix.device).expand(n, -1)
        squares = self.matrix * self.matrix
        return list(torch.segment_reduce(squares, "sum", lengths=lengths, axis=1).double().unbind(1))

    def clipped_sum(self, key: tuple[str, int | None], group: int, factors: Tensor) -> Tensor:
        """sum_i factors[i] G_i for the block ``key`` of ``group`` (the same factors for every block of the group),
        fp32, of the block's shape."""
        if key not in self._sums:  # the group's first block: every block of the group at once
            first, last = self._groups[group]
            keys = [k for k, (start, _, _) in self._columns.items() if first <= start < last]
            columns = self.matrix if last - first == self.matrix.shape[1] else self.matrix[:, first:last]
            summed = torch.mv(columns.T, factors)
            widths = [self._columns[k][1] - self._columns[k][0] for k in keys]
            self._sums.update(zip(keys, summed.split(widths) if len(keys) > 1 else [summed]))
        block, shape = self._sums.pop(key), self._columns[key][2]
        return block if len(shape) == 1 else block.view(shape)


def _matrix(vectors: Tensor | None) -> Tensor:
    """[n, *shape] -> [n, prod(shape)] fp32 (no operator where it is that already)."""
    assert vectors is not None
    return vectors if vectors.dim() == 2 and vectors.dtype is torch.float32 else _f32(vectors).flatten(1)


def zero_rows(c: Contribution, rows: Tensor) -> Contribution:
    """A copy of ``c`` whose examples ``rows`` ([n] bool) contribute exactly 0 (their values may be inf or NaN)."""

    def clean(t: Tensor | None) -> Tensor | None:
        if t is None or not t.is_floating_point():
            return t  # INDEX ids: the zeroed right factor already removes the rows
        keep = ~rows.view(-1, *([1] * (t.dim() - 1))).to(t.device)
        return torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))

    c = c.factored()
    return dataclasses.replace(
        c, left=clean(c.left), right=clean(c.right), instantiated=clean(c.instantiated), weighted_sum=None,
        build_right=None,
    )  # fmt: skip
