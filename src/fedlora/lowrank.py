"""Low-rank algebra on factors: never forms a ``d_out x d_in`` matrix unless asked.

Everything works on :class:`~fedlora.types.LowRank` products ``L @ R`` with ``L`` ``(m, k)`` and ``R``
``(k, n)``, ``k`` small. The key identity is that for ``X = L R`` with ``L = Q1 R1`` and
``R^T = Q2 R2`` (thin QRs), ``X = Q1 (R1 R2^T) Q2^T``: the SVD, norm and rank of ``X`` are those of the
small ``k x k`` core ``R1 R2^T``. Cost ``O((m + n) k^2)`` instead of ``O(m n min(m, n))``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from .dense_svd import probed_residual, top_triplets
from .types import LoRAFactors, LowRank


def concat(terms: Sequence[LowRank], coeffs: Sequence[float] | None = None) -> LowRank:
    """``sum_i c_i L_i R_i`` as one product ``[c_1 L_1, ..., c_K L_K] @ [R_1; ...; R_K]``."""
    if not terms:
        raise ValueError("concat needs at least one term")
    m, n = terms[0].shape
    for t in terms:
        if t.shape != (m, n):
            raise ValueError(f"cannot add products of shapes {(m, n)} and {t.shape}")
    if coeffs is None:
        left = torch.cat([t.left for t in terms], dim=1)
    else:  # scaled straight into the stacked factor: one pass over the lefts, no scaled copies
        coeffs = list(coeffs)
        if len(coeffs) != len(terms):
            raise ValueError(f"concat: {len(terms)} terms but {len(coeffs)} coefficients")
        left = torch.empty(m, sum(t.rank for t in terms), dtype=_sum_dtype(terms), device=terms[0].left.device)
        start = 0
        for t, c in zip(terms, coeffs):
            torch.mul(t.left, float(c), out=left[:, start:start + t.rank])
            start += t.rank
    return LowRank(left, torch.cat([t.right for t in terms], dim=0))


def _sum_dtype(terms: Sequence[LowRank]) -> torch.dtype:
    """The floating dtype a weighted sum of ``terms`` is formed in: their left factors' dtypes promoted."""
    dtype = torch.result_type(terms[0].left, 1.0)
    for t in terms[1:]:
        dtype = torch.promote_types(dtype, t.left.dtype)
    return dtype


def subtract(a: LowRank, b: LowRank) -> LowRank:
    """``a - b`` as one product."""
    return concat([a, b], [1.0, -1.0])


DENSE_FRACTION = 0.6
"""When the inner dimension ``k`` reaches this fraction of ``min(m, n)``, forming ``L R`` is cheaper than the
two QRs of the factored path, in time and in memory. Measured with a whole FRA round (``docs/aggregation.md``):
at ``k / d = 0.52`` the factored round is 1.5x faster than the dense one at ``d = 768`` and 2.3x at ``d = 2048``,
they are level at 0.67, and the dense one wins from about 0.8."""


def prefers_dense(x: LowRank) -> bool:
    """Whether :func:`svd` and :func:`frobenius_norm` take the dense path for ``x`` (same results)."""
    return dense_is_cheaper(*x.shape, x.rank)


def dense_is_cheaper(m: int, n: int, k: int) -> bool:
    """Whether an ``(m, n)`` product of inner dimension ``k`` is better formed than kept factored."""
    return k >= DENSE_FRACTION * min(m, n)


def dense_sum(terms: Sequence[LowRank], coeffs: Sequence[float]) -> Tensor:
    """``sum_i c_i L_i R_i`` as a dense matrix, accumulated term by term (the factors are never stacked)."""
    m, n = terms[0].shape
    dtype = _sum_dtype(terms)
    out = torch.zeros(m, n, dtype=dtype, device=terms[0].left.device)
    for t, c in zip(terms, coeffs, strict=True):
        if t.rank:
            out.addmm_(t.left.to(dtype), t.right.to(dtype), alpha=float(c))
    return out


def _core(x: LowRank) -> tuple[Tensor, Tensor, Tensor]:
    """Thin QRs of both factors: ``x = Q1 @ core @ Q2^T``."""
    q1, r1 = torch.linalg.qr(x.left)
    q2, r2 = torch.linalg.qr(x.right.mT)
    return q1, r1 @ r2.mT, q2


def svd(x: LowRank) -> tuple[Tensor, Tensor, Tensor]:
    """Thin SVD ``x = U diag(S) Vh`` through the small core; ``len(S) <= min(k, m, n)``.

    When ``k`` is close to ``min(m, n)`` (:func:`prefers_dense`) the product is formed and decomposed
    directly: the small core would be nearly as large, after two QRs of the factors.
    """
    if x.rank == 0:
        m, n = x.shape
        return x.left.new_zeros(m, 0), x.left.new_zeros(0), x.right.new_zeros(0, n)
    if prefers_dense(x):
        keep = min(x.rank, *x.shape)
        u, s, vh = torch.linalg.svd(x.left @ x.right, full_matrices=False)
        return u[:, :keep], s[:keep], vh[:keep]
    q1, core, q2 = _core(x)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    return q1 @ u, s, vh @ q2.mT


def frobenius_norm(x: LowRank) -> float:
    """``||L R||_F`` without forming ``L R``; accurate even when the terms of ``x`` cancel.

    One thin QR, of the factor on the shorter outer side and without forming ``Q``: with ``L = Q1 R1``,
    ``||L R||_F = ||R1 R||_F`` (a ``k x n`` product); else ``R^T = Q2 R2`` and ``||L R||_F = ||L R2^T||_F``.
    Backward stable like the two-sided core (error ``~ eps ||L|| ||R||``), at about a third of its cost.
    The sum of squares is taken in float64, a block of rows at a time (no float64 copy of the whole).
    """
    if x.rank == 0:
        return 0.0
    m, n = x.shape
    if prefers_dense(x):  # the product a block of rows at a time, in x's precision (float64 where it matters)
        rows = max(1, (1 << 20) // n)
        return math.sqrt(sum(float((block @ x.right).double().square().sum()) for block in x.left.split(rows)))
    if m <= n:
        reduced = torch.linalg.qr(x.left, mode="r").R @ x.right
    else:
        reduced = x.left @ torch.linalg.qr(x.right.mT, mode="r").R.mT
    rows = max(1, (1 << 18) // max(1, reduced.shape[1]))
    return math.sqrt(sum(float(block.double().square().sum()) for block in reduced.split(rows)))


def inner(x: LowRank, y: LowRank) -> Tensor:
    """``<X, Y>_F = tr((Ly^T Lx)(Rx Ry^T))`` without forming either matrix."""
    return torch.sum((y.left.mT @ x.left) * (y.right @ x.right.mT))


def inner_matrix(terms: Sequence[LowRank]) -> Tensor:
    """All pairwise inner products ``G[a, b] = <T_a, T_b>_F`` of several products of one shape at once.

    One stacked product ``[L_1 ... L_T] [R_1; ...; R_T]``: ``H = (L^T L) * (R R^T)`` and ``G[a, b]`` is the sum
    of ``H``'s ``(a, b)`` block, the same sums :func:`inner` forms pair by pair. Cost ``2 k^2 (m + n)`` for
    the total inner dimension ``k``, against ``T^2`` calls of :func:`inner`; the inner product of any two
    linear combinations of the terms follows as ``c1^T G c2``.
    """
    if not terms:
        raise ValueError("inner_matrix needs at least one term")
    stacked = concat(terms)
    h = (stacked.left.mT @ stacked.left) * (stacked.right @ stacked.right.mT)
    ranks = torch.tensor([t.rank for t in terms], device=h.device)
    block = torch.repeat_interleave(torch.arange(len(terms), device=h.device), ranks)
    onehot = torch.nn.functional.one_hot(block, len(terms)).to(h.dtype)  # (k, T)
    return onehot.mT @ h @ onehot


def split_factors(u: Tensor, s: Tensor, vh: Tensor, split: str = "balanced") -> LowRank:
    """Turn an SVD into two factors: ``balanced`` (U S^1/2, S^1/2 V^T), ``left`` (U S, V^T), ``right``
    (U, S V^T)."""
    left_scale, right_scale = _split_scales(s, split)
    return LowRank(u * left_scale, right_scale[:, None] * vh)


class Truncation(NamedTuple):
    """What :func:`truncation` returns: the best rank-``r`` head, the exact remainder, and how exact."""

    head: LowRank
    tail: LowRank
    tail_singular_values: Tensor | None
    """The tail's singular values, or ``None`` where only the top ones were computed (the dense path with
    the factors given: the tail is then ``(I - U U^T) L R``, not in singular form)."""
    core_residual: float | None
    """``||core - U S V^T||_F`` of the small SVD, in float64: how far ``head + tail`` is from ``x`` in the
    basis of its factors (the rounding of the decomposition, not of forming the factors afterwards). On the
    dense path, ``||L R - U S V^T||_F`` of the formed product, estimated from probes
    (:func:`probed_residual`), or with the top triplets alone ``||U^T M - S V^T||_F``. ``None`` when the
    caller did not ask for it."""


def truncation(x: LowRank, rank: int, split: str = "balanced", *, residual: bool = True) -> Truncation:
    """Best rank-``rank`` approximation of ``x`` (Eckart-Young), the exact SVD remainder, and its residual.

    ``head`` always has inner dimension ``rank`` (padded with zero directions when ``x`` has lower rank),
    ``head + tail == x`` up to rounding, and ``||tail||_F`` is the root-sum-square of the tail's singular
    values. The residual lets a caller know the error of ``head`` (``sqrt(residual^2 + ||tail||^2)``) or of
    ``head + tail`` (the residual) from the small core, without another pass over the factors.
    """
    m, n = x.shape
    if x.rank == 0:
        u, s, vh = svd(x)
        return Truncation(_pad_head(split_factors(u, s, vh, split), rank), LowRank(u, vh), s, 0.0)
    if prefers_dense(x):
        return dense_truncation(x.left @ x.right, x.rank, rank, split, residual=residual)
    q1, core, q2 = _core(x)
    u, s, vh = torch.linalg.svd(core, full_matrices=False)
    core_residual = None
    if residual:
        core_residual = float((core.double() - (u.double() * s.double()) @ vh.double()).norm())
    # The singular values go onto the small SVD factors before the two products with Q1 and Q2, so head and
    # tail come out of them directly (no pass over the (m, k) and (k, n) results).
    keep = min(rank, s.numel())
    left_scale, right_scale = _split_scales(s[:keep], split)
    head = LowRank(q1 @ (u[:, :keep] * left_scale), (right_scale[:, None] * vh[:keep]) @ q2.mT)
    tail = LowRank(q1 @ (u[:, keep:] * s[keep:]), vh[keep:] @ q2.mT)
    return Truncation(_pad_head(head, rank), tail, s[keep:], core_residual)


def dense_truncation(product: Tensor, inner: int, rank: int, split: str = "balanced", *,
                     residual: bool = True, factors: LowRank | None = None) -> Truncation:
    """:func:`truncation` of a formed product of inner dimension ``inner`` (for when :func:`dense_is_cheaper`
    and the caller accumulated the sum itself, never stacking the factors).

    With ``factors`` (``factors.left @ factors.right == product``), only the top ``rank`` triplets are
    computed when that converges (:func:`~fedlora.dense_svd.top_triplets`, a few products with ``product``
    instead of its full SVD), and the tail is the exact remainder ``(L - U (U^T L)) R`` from the factors:
    ``head + tail = L R`` for any ``U``, and ``core_residual`` is ``||U^T M - S V^T||``, how far the head is
    from ``U U^T M``. Otherwise (or when it would not converge), the full SVD and the tail in singular form.
    """
    m, n = product.shape
    top = top_triplets(product, rank) if factors is not None and rank <= min(m, n) else None
    if top is not None:
        dtype = product.dtype
        del product
        u = top.U.to(dtype)
        head = split_factors(u, top.S.to(dtype), top.Vh.to(dtype), split)
        left, basis = factors.left, top.U.to(factors.left.dtype)
        tail = LowRank(left - basis @ (basis.mT @ left), factors.right)
        return Truncation(head, tail, None, top.residual if residual else None)
    keep_all = min(inner, m, n)
    u, s, vh = torch.linalg.svd(product, full_matrices=False)
    u, s, vh = u[:, :keep_all], s[:keep_all], vh[:keep_all]
    core_residual = probed_residual(product, u, s, vh) if residual else None
    del product
    keep = min(rank, s.numel())
    head = split_factors(u[:, :keep], s[:keep], vh[:keep], split)
    tail = LowRank(u[:, keep:] * s[keep:], vh[keep:])
    return Truncation(_pad_head(head, rank), tail, s[keep:], core_residual)


def _split_scales(s: Tensor, split: str) -> tuple[Tensor, Tensor]:
    """What :func:`split_factors` multiplies ``U``'s columns and ``V^T``'s rows by."""
    if split == "balanced":
        root = s.sqrt()
        return root, root
    if split == "left":
        return s, torch.ones_like(s)
    if split == "right":
        return torch.ones_like(s), s
    raise ValueError(f"unknown split {split!r}; expected 'balanced', 'left' or 'right'")


def _pad_head(head: LowRank, rank: int) -> LowRank:
    """Zero directions up to inner dimension ``rank`` (when ``x`` has lower rank than asked)."""
    m, n = head.shape
    if head.rank >= rank:
        return head
    return LowRank(torch.cat([head.left, head.left.new_zeros(m, rank - head.rank)], dim=1),
                   torch.cat([head.right, head.right.new_zeros(rank - head.rank, n)], dim=0))


def truncate(x: LowRank, rank: int, split: str = "balanced") -> tuple[LowRank, LowRank, Tensor]:
    """``(head, tail, tail_singular_values)`` of :func:`truncation`."""
    head, tail, tail_sv, _ = truncation(x, rank, split, residual=False)
    return head, tail, tail_sv


def recompress(x: LowRank, rtol: float | None = None) -> LowRank:
    """Drop directions whose singular value is below ``rtol * s_max`` (default: a few ulps): same
    matrix, smaller inner dimension."""
    if x.rank == 0:
        return x
    u, s, vh = svd(x)
    if rtol is None:
        rtol = 8 * torch.finfo(s.dtype).eps * max(x.shape)
    keep = int((s > rtol * s.max()).sum()) if s.numel() else 0
    return LowRank(u[:, :keep] * s[:keep], vh[:keep])


def compact(x: LowRank) -> LowRank:
    """Re-compress when the inner dimension has grown past where the factors cost less than dense."""
    m, n = x.shape
    if x.rank * (m + n) > m * n or x.rank > min(m, n):
        return recompress(x)
    return x


def wire_numel(x: LowRank) -> int:
    """Numbers needed to ship ``x``: its factors, or the dense matrix when that is smaller."""
    m, n = x.shape
    return 0 if x.rank == 0 else min(x.numel(), m * n)


def densify(x: LowRank, layout: str = "linear") -> Tensor:
    """Dense matrix in the frozen weight's storage orientation (``conv1d`` stores ``W^T``)."""
    dense = x.dense()
    return dense.mT if layout == "conv1d" else dense


@torch.no_grad()
def fold_into_weight(weight: Tensor, correction: LowRank, layout: str = "linear") -> Tensor:
    """``W += correction`` in place, in ``weight``'s storage orientation; returns ``weight``.

    ``nn.Linear`` stores ``W`` as ``(d_out, d_in)``, GPT-2's ``Conv1D`` as ``(d_in, d_out)``; a square
    weight hides a missing transpose, so the orientation comes from ``layout``, never from shapes.
    """
    if correction.rank == 0:
        return weight
    m, n = correction.shape
    expected = (n, m) if layout == "conv1d" else (m, n)
    if tuple(weight.shape) != expected:
        raise ValueError(f"{layout} weight of shape {tuple(weight.shape)} cannot take a {m}x{n} correction")
    # Accumulate in float32 at least: the correction is small next to W.
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    update = densify(LowRank(correction.left.to(work), correction.right.to(work)), layout)
    weight.copy_((weight.to(work) + update).to(weight.dtype))
    return weight


def pad_rank(factors: LoRAFactors, rank: int) -> LoRAFactors:
    """Zero-pad an adapter to a larger rank; the product is unchanged."""
    extra = rank - factors.rank
    if extra < 0:
        raise ValueError(f"cannot pad rank {factors.rank} down to {rank}")
    if extra == 0:
        return factors
    B = torch.cat([factors.B, factors.B.new_zeros(factors.B.shape[0], extra)], dim=1)
    A = torch.cat([factors.A, factors.A.new_zeros(extra, factors.A.shape[1])], dim=0)
    return LoRAFactors(B, A, factors.scale)


def factors_from_product(x: LowRank, scale: float, split: str = "balanced") -> LoRAFactors:
    """Adapter whose update ``scale * B A`` equals ``x``, dividing the scale out where ``split`` says:
    evenly (``balanced``), into ``B`` (``left``: keeps ``A``'s rows orthonormal) or into ``A`` (``right``)."""
    if split == "left":
        return LoRAFactors(x.left / scale, x.right, scale)
    if split == "right":
        return LoRAFactors(x.left, x.right / scale, scale)
    root = scale ** 0.5
    return LoRAFactors(x.left / root, x.right / root, scale)


def proximal_penalty(B: Tensor, A: Tensor, B0: Tensor, A0: Tensor) -> Tensor:
    """``||B A - B0 A0||_F^2`` in factored form (differentiable), for a client-side proximal term."""
    bb = (B.mT @ B) * (A @ A.mT)
    cross = (B0.mT @ B) * (A0 @ A.mT)  # <BA, B0A0> = sum((B0^T B) * (A0 A^T))
    ref = (B0.mT @ B0) * (A0 @ A0.mT)
    return bb.sum() - 2 * cross.sum() + ref.sum()


def rank_norms(B: Tensor, A: Tensor) -> Tensor:
    """``||b_i|| ||a_i||`` per rank ``i`` (``b_i`` column of ``B``, ``a_i`` row of ``A``) = ``||b_i a_i^T||_F``."""
    return B.norm(dim=0) * A.norm(dim=1)


def tail_penalty(B: Tensor, A: Tensor, tail: int) -> Tensor:
    """``sum_{i in last tail ranks} ||b_i|| ||a_i||`` (differentiable): HetLoRA's self-pruning penalty."""
    if tail <= 0:
        return B.new_zeros(())
    return rank_norms(B[:, -tail:], A[-tail:]).sum()


def pruned_rank(factors: Sequence[tuple[Tensor, Tensor]], threshold: float, floor: int = 1) -> int:
    """The rank left after pruning trailing ranks whose share ``||b_i a_i^T||_F / ||B A||_F`` is below
    ``threshold`` in every module of ``factors`` (``(B, A)`` pairs of one rank); never below ``floor``.

    A module whose ``B A`` is zero has no share to keep (its ranks count as prunable).
    """
    rank = factors[0][0].shape[1] if factors else 0
    keep = min(max(floor, 1), rank)
    shares = []
    for B, A in factors:
        B64, A64 = B.detach().double(), A.detach().double()
        total = frobenius_norm(LowRank(B64, A64))
        shares.append(rank_norms(B64, A64) / total if total > 0 else torch.zeros(rank, dtype=torch.float64))
    while rank > keep and all(float(s[rank - 1]) < threshold for s in shares):
        rank -= 1
    return rank
