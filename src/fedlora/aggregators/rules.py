"""Pieces of aggregation rules shared by several methods.

Each works on one module of a :class:`~fedlora.aggregators.base.Round`: factor averages at the global rank
(:func:`padded_mean`, FFA's :func:`frozen_a_mean`), FedEx's exact residual kept as factors
(:func:`exact_residual`), and the top-``r`` SVD re-factorisation of the exact mean product with its tail
(:func:`refactorized`), which revives empty rank slots (:func:`revive_dead_ranks`).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import torch

from .. import lowrank
from ..types import LoRAFactors, LowRank
from .accounting import dense_mean_update
from .base import Round


def padded_mean(rnd: Round, module: str, weights: Sequence[float] | None = None) -> LoRAFactors:
    """``B = sum_k p_k (s_k / s) pad(B_k)``, ``A = sum_k p_k pad(A_k)`` at the global rank and scale.

    Zero-padding leaves each product unchanged and ``s_k / s`` keeps ``s B_k A_k = s_k B_k A_k`` when
    clients use other ranks (``s = alpha / r``).
    """
    g = rnd.global_state[module].factors
    w = rnd.weights if weights is None else weights
    B = torch.zeros_like(g.B)
    A = torch.zeros_like(g.A)
    for p, client in zip(w, rnd.trained):
        f = lowrank.pad_rank(client[module], g.rank)
        B += (p * f.scale / g.scale) * f.B
        A += p * f.A
    return LoRAFactors(B, A, g.scale)


def frozen_a_mean(rnd: Round, module: str) -> LoRAFactors:
    """FFA's rule: ``B = sum_k p_k (s_k / s) pad(B_k)`` and ``A`` the global (frozen) ``A``.

    Clients of rank ``r_k`` train against the first ``r_k`` rows of the global ``A``, so
    ``s B A = sum_k p_k s_k B_k A[:r_k]`` exactly. Averaging the zero-padded ``A`` rows instead (as
    :func:`padded_mean` does) would shrink the rows only large-rank clients hold and break exactness
    whenever ranks differ.
    """
    mean = padded_mean(rnd, module)
    return LoRAFactors(mean.B, rnd.global_state[module].factors.A.clone(), mean.scale)


def exact_residual(rnd: Round, module: str, mean: LoRAFactors) -> LowRank:
    """``R = sum_k p_k s_k B_k A_k - s B A`` for ``B, A`` from :func:`padded_mean`, kept as factors.

    With ``Bt_k = (s_k / s) pad(B_k)`` and ``sum_k p_k (Bt_k - B) = 0``,
    ``R = s sum_{k<K} p_k (Bt_k - B)(A_k - A_K)``: inner dimension ``(K - 1) r``, the bound on its rank.
    Clients holding frozen terms (HEXA's heterogeneous ranks) fall back to ``M - s B A``, re-compressed.
    """
    if rnd.has_frozen_terms():
        return lowrank.compact(lowrank.subtract(rnd.mean_update(module), mean.as_lowrank()))
    g = rnd.global_state[module].factors
    padded = [lowrank.pad_rank(c[module], g.rank) for c in rnd.trained]
    last = padded[-1]
    terms = [
        LowRank((p * mean.scale) * (f.B * (f.scale / mean.scale) - mean.B), f.A - last.A)
        for p, f in zip(rnd.weights[:-1], padded[:-1])
    ]
    if not terms:  # one client: the mean is the client, nothing is left over
        return LowRank.zeros(*g.shape, dtype=g.B.dtype, device=g.B.device)
    return lowrank.concat(terms)


def revive_dead_ranks(factors: LoRAFactors, seed: int) -> LoRAFactors:
    """Give rank slots where both ``B``'s column and ``A``'s row are zero a fresh PEFT-style ``A`` row.

    Such a slot would get zero gradient in both factors forever; with ``B = 0`` the product is unchanged.
    """
    dead = (factors.B.abs().sum(0) == 0) & (factors.A.abs().sum(1) == 0)
    if not bool(dead.any()):
        return factors
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(factors.A.shape[1])  # kaiming_uniform(a=sqrt(5)), as PEFT initialises A
    fresh = (torch.rand(int(dead.sum()), factors.A.shape[1], generator=gen, dtype=torch.float64) * 2 - 1) * bound
    A = factors.A.clone()
    A[dead] = fresh.to(A.dtype).to(A.device)
    return LoRAFactors(factors.B, A, factors.scale)


def refactorized(rnd: Round, module: str, split: str = "balanced", *,
                 folded: bool = True) -> tuple[LoRAFactors, LowRank]:
    """Top-``r`` SVD of ``M = sum_k p_k (client k's update)`` as the new adapter, and the exact tail.

    ``folded`` says whether the caller folds the tail into ``W``: with ``rnd.error_measure == "core"`` the
    module's error ``||M - applied||`` is then known from the small core (the SVD's residual, plus the tail's
    singular values when it is dropped) and recorded in ``rnd.core_errors``.
    """
    g = rnd.global_state[module].factors
    inner, core = rnd.inner_rank(module), rnd.error_measure == "core"
    if inner and lowrank.dense_is_cheaper(*g.shape, inner):  # formed term by term, as a dense reference would
        cut = lowrank.dense_truncation(dense_mean_update(rnd, module), inner, g.rank, split, residual=core,
                                       factors=rnd.mean_update(module))  # the tail from them: no full SVD
    else:
        cut = lowrank.truncation(rnd.mean_update(module), g.rank, split, residual=core)
    head, tail, tail_sv, residual = cut
    if core:
        dropped = 0.0
        if not folded:
            dropped = (float(tail_sv.double().square().sum()) if tail_sv is not None
                       else lowrank.frobenius_norm(tail) ** 2)
        rnd.core_errors[module] = math.sqrt(residual * residual + dropped)
    factors = lowrank.factors_from_product(head, g.scale, split)
    return revive_dead_ranks(factors, seed=zlib.crc32(f"{rnd.round_idx}:{module}".encode())), tail
