"""FRA-LoRA: full rank aggregation, then SVD back to rank ``r``.

Trautmann, Hales and Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning", 2025.

.. math::

    M = \\sum_k p_k s_k B_k A_k = U \\Sigma V^\\top, \\qquad
    s B A = U_r \\Sigma_r V_r^\\top \\; (\\text{split } U_r\\Sigma_r^{1/2}, \\Sigma_r^{1/2}V_r^\\top
    \\text{ by default}),

and the tail :math:`M - sBA` is dropped (error :math:`\\sqrt{\\sum_{i>r}\\sigma_i^2}`, Eckart-Young) or, with
``fold_tail=True``, folded into ``W`` (exact). Hybrid schedule from the paper: with ``ffa_after=T0``, rounds
``0..T0-1`` are FRA (round ``T0-1`` takes the ``(U S, V^T)`` split so ``A`` has orthonormal rows), then ``A``
freezes and later rounds are FFA-LoRA (only ``B`` trains and is averaged). DP: clients privatise locally;
the product and SVD at the server are post-processing. The split choice is the project's, the paper's text
being silent on it.
"""

from __future__ import annotations

import torch

from ..types import LoRAFactors
from .base import Aggregator, Round, register
from .rules import frozen_a_mean, refactorized


@register
class FRALoRA(Aggregator):
    """SVD of the exact mean product; optionally fold the tail; optional switch to FFA."""

    name = "fra"
    exact = False

    def __init__(self, fold_tail: bool = False, split: str = "balanced", ffa_after: int | None = None):
        if split not in ("balanced", "left", "right"):
            raise ValueError(f"fra: split must be 'balanced', 'left' or 'right', got {split!r}")
        if ffa_after is not None and ffa_after < 1:
            raise ValueError(f"fra: ffa_after must be >= 1 (rounds of FRA before freezing A), got {ffa_after}")
        self.fold_tail = fold_tail
        self.split = split
        self.ffa_after = ffa_after
        self.exact = fold_tail

    def trains(self, round_idx: int) -> tuple[bool, bool]:
        return self.ffa_after is None or round_idx < self.ffa_after, True

    def _combine(self, rnd: Round):
        if not self.trains(rnd.round_idx)[0]:  # FFA phase: A is frozen, B averages exactly
            return {m: frozen_a_mean(rnd, m) for m in rnd.modules}, {}
        switch = self.ffa_after is not None and rnd.round_idx == self.ffa_after - 1
        split = "left" if switch else self.split
        factors, corrections = {}, {}
        for m in rnd.modules:
            factors[m], tail = refactorized(rnd, m, split, folded=self.fold_tail)
            if switch:
                factors[m] = _orthonormal_free_rows(factors[m])
            if self.fold_tail:
                corrections[m] = tail
        return factors, corrections


def _orthonormal_free_rows(f: LoRAFactors) -> LoRAFactors:
    """Make ``A``'s rows orthonormal where ``B``'s column is zero (so the product does not change).

    When ``M`` has rank below ``r`` the SVD leaves empty slots, which :func:`revive_dead_ranks` fills with
    random rows; ``A`` is about to freeze for good, and the schedule promises orthonormal rows. Those free
    rows are replaced by an orthonormal basis of part of the live rows' orthogonal complement (impossible,
    and left alone, when ``d_in < r``).
    """
    free = f.B.abs().sum(0) == 0
    r, d_in = f.A.shape
    if not bool(free.any()) or d_in < r:
        return f
    A = f.A.clone()
    live = A[~free]  # orthonormal rows (the ``(U S, V^T)`` split)
    fresh = A[free]
    for _ in range(2):  # project out the live rows; twice for orthogonality to working precision
        fresh = fresh - (fresh @ live.mT) @ live
    q, _ = torch.linalg.qr(fresh.mT)  # (d_in, n_free), orthonormal columns
    A[free] = q.mT
    return LoRAFactors(f.B, A, f.scale)
