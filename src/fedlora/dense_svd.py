"""SVD work on a formed (dense) matrix: its top singular triplets alone, and a cheap residual estimate.

The dense path of :mod:`fedlora.lowrank` forms ``M`` when the factors' inner dimension is close to
``min(m, n)``. A full SVD of ``M`` costs ``O(m n min(m, n))`` (LAPACK ``gesdd``); an aggregator needs only the
top ``r`` triplets when the remainder can be written without them (``M - U U^T M`` from the factors of
``M``). :func:`top_triplets` finds them by block subspace iteration with Rayleigh-Ritz, ``O(m n r)`` per step,
and certifies them by their residual; it gives up (returns ``None``) when the spectrum has no gap after
the top ``r`` for the iteration to converge in a few steps, and the caller then runs the full SVD.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

MAX_STEPS = 8
"""Subspace iteration steps at most. Each costs about ``2 q / min(m, n)`` of a full SVD for a block of ``q``
vectors (two products with ``M`` in float64); :func:`top_triplets` is only tried where ``q`` is small."""

WORTH_IT = 0.25
"""Try the iteration only when the block is at most this fraction of ``min(m, n)``."""


class TopTriplets(NamedTuple):
    """``M ~ U diag(S) Vh`` on its top ``r`` singular triplets, in float64."""

    U: Tensor
    S: Tensor
    Vh: Tensor
    residual: float
    """``||U^T M - diag(S) Vh||_F`` (the other side, ``M Vh^T - U diag(S)``, is zero by construction): how
    far ``U U^T M`` is from ``U diag(S) Vh``."""
    steps: int


def block_size(rank: int, m: int, n: int) -> int:
    """Vectors iterated for the top ``rank``: ``2 rank``, at least ``rank + 8`` (the oversampling sets the
    convergence rate, ``(sigma_{q+1} / sigma_rank)^2`` per step)."""
    return min(max(2 * rank, rank + 8), m, n)


def top_triplets(product: Tensor, rank: int, *, tol: float | None = None,
                 max_steps: int = MAX_STEPS) -> TopTriplets | None:
    """The top ``rank`` singular triplets of ``product``, or ``None`` when a full SVD is the better way.

    Block subspace iteration on ``M`` and ``M^T`` in float64 from a seeded Gaussian start (reproducible), with
    a Rayleigh-Ritz step each time: ``Z`` an orthonormal basis of the row space iterate, ``M Z = Q R``,
    ``R = Ub S Vb^T``, ``U = Q Ub``, ``V = Z Vb``, so ``M V = U S`` exactly and the iteration stops when
    ``max_i ||M^T u_i - s_i v_i|| <= tol * s_1`` (default: four units of ``product``'s rounding, the accuracy
    of LAPACK's own SVD in that precision, or for float64 input the iteration's own rounding floor). It
    stops early, returning ``None``, when the measured rate of convergence says ``max_steps`` will not be
    enough (no gap after ``sigma_rank``), or when the block is too large a share of ``min(m, n)`` for the
    iteration to be cheaper than the full SVD.
    """
    m, n = product.shape
    q = block_size(rank, m, n)
    if rank < 1 or q > WORTH_IT * min(m, n):
        return None
    if tol is None:  # the input's rounding, or the float64 iteration's own floor (~eps sqrt(n) sigma_1)
        floor = 64 * math.sqrt(max(m, n)) * torch.finfo(torch.float64).eps
        tol = max(4 * torch.finfo(product.dtype).eps, floor)
    md = product.double()
    gen = torch.Generator(device=product.device).manual_seed(0)
    start = torch.randn(n, q, generator=gen, dtype=torch.float64, device=product.device)
    basis = torch.linalg.qr(md @ start).Q
    back = md.mT @ basis  # M^T Q: the residual check and the next step's start, one product for both
    previous = math.inf
    for step in range(1, max_steps + 1):
        z = torch.linalg.qr(back).Q
        basis, r_factor = torch.linalg.qr(md @ z)
        ub, s, vbh = torch.linalg.svd(r_factor)
        back = md.mT @ basis
        v = z @ vbh[:rank].mT
        columns = (back @ ub[:, :rank] - v * s[:rank]).norm(dim=0)  # ||M^T u_i - s_i v_i||
        worst, top = float(columns.max()), float(s[0])
        if worst <= tol * top:  # U = Q Ub only now: the steps before need V and M^T Q alone
            return TopTriplets(basis @ ub[:, :rank], s[:rank], v.mT, float(columns.norm()), step)
        if step >= 2 and top > 0:
            rate = worst / previous
            if rate >= 1 or step + math.log(tol * top / worst) / math.log(rate) > max_steps:
                return None
        previous = worst
    return None


RESIDUAL_PROBES = 8


def probed_residual(product: Tensor, u: Tensor, s: Tensor, vh: Tensor,
                    probes: int = RESIDUAL_PROBES) -> float:
    """``||product - U diag(s) Vh||_F`` estimated from ``probes`` fixed Gaussian vectors ``g`` (Hutchinson:
    ``E ||E g||^2 = ||E||_F^2``), in float64, in row blocks of ``product``.

    The exact residual is one more product as large as the matrix (5 % of the SVD's time at d = 768, where
    the dense path is taken, measured); this costs ``O(m n probes)``. For a residual spread over many
    directions, as rounding is, the relative standard deviation of the squared estimate is about
    ``sqrt(2 / (probes * its effective rank))``: ~2 % at rank 768. The probes are seeded: reproducible.
    """
    m, n = product.shape
    gen = torch.Generator(device=product.device).manual_seed(0)
    g = torch.randn(n, probes, generator=gen, dtype=torch.float64, device=product.device)
    right = s.double()[:, None] * (vh.double() @ g)
    total, step = 0.0, max(1, 2**18 // max(n, 1))
    for i in range(0, m, step):
        e = product[i:i + step].double() @ g - u[i:i + step].double() @ right
        total += float(e.square().sum())
    return math.sqrt(total / probes)
