"""A client's update norm in factored form, and bounds on it.

Client ``k`` starts from ``(B_0, A_0)`` and returns ``(B_k, A_k)``; its update to the model is
``D_k = s (B_k A_k - B_0 A_0)``. Its Frobenius norm is taken from the stacked product
``[s B_k, -s B_0] [A_k; A_0]`` (:func:`fedlora.lowrank.frobenius_norm`), never forming a ``d_out x d_in``
matrix; over modules the norms add in squares.

Clipping must keep a client's reply a rank-``r`` adapter that every method can aggregate, so it moves both
factors back toward the start by one shared fraction ``t`` (``B = B_0 + t (B_k - B_0)``, the same for
``A``); ``t`` is found by bisection and only values whose norm was checked to be at most the bound are used,
so a clipped update never exceeds it. (``t`` is a scale on the factors, not on ``D_k``: the product is
quadratic in ``t``, which is why it is searched for rather than computed.)

:func:`bound_updates` is the guard without DP: an update whose norm is more than ``factor`` times the round's
median is clipped to that bound or rejected.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

import torch

from .. import lowrank
from ..types import LoRAFactors, LowRank

_BISECTION_STEPS = 40


def _module_norm(start: LoRAFactors, trained: LoRAFactors) -> float:
    s = trained.scale
    stacked = LowRank(torch.cat([s * trained.B, -start.scale * start.B], dim=1), torch.cat([trained.A, start.A]))
    return lowrank.frobenius_norm(stacked)


def update_norm(start: dict[str, LoRAFactors], trained: dict[str, LoRAFactors],
                heads: tuple[dict, dict] | None = None) -> float:
    """``sqrt(sum_m ||s (B_m A_m - B_0m A_0m)||_F^2)`` over the modules of ``trained``; with
    ``heads=(h_0, h)`` also ``+ sum ||h - h_0||^2`` over the head's tensors."""
    total = sum(_module_norm(start[m], f) ** 2 for m, f in trained.items())
    if heads is not None:
        total += sum(float((heads[1][k].double() - h0.double()).square().sum()) for k, h0 in heads[0].items())
    return math.sqrt(total)


def towards_head(head_start: dict, head: dict, t: float) -> dict:
    """``h_0 + t (h - h_0)``: a head moved back toward the start by the clip's fraction ``t``."""
    return head if t == 1.0 else {k: h0 + t * (head[k] - h0) for k, h0 in head_start.items()}


def _towards(start: dict[str, LoRAFactors], trained: dict[str, LoRAFactors], t: float) -> dict[str, LoRAFactors]:
    return {m: LoRAFactors(start[m].B + t * (f.B - start[m].B), start[m].A + t * (f.A - start[m].A), f.scale)
            for m, f in trained.items()}


def clip_update(start: dict[str, LoRAFactors], trained: dict[str, LoRAFactors], bound: float,
                heads: tuple[dict, dict] | None = None) -> tuple[dict[str, LoRAFactors], float]:
    """Factors whose update norm is at most ``bound`` (``trained`` itself when it already is); and ``t``.

    With ``heads=(h_0, h)`` the head's change counts in the norm, and the caller moves the head by the same
    ``t`` (:func:`towards_head`).
    """
    if not bound >= 0:
        raise ValueError(f"an update bound must be a number >= 0, got {bound}")
    if update_norm(start, trained, heads) <= bound:
        return trained, 1.0
    low, high = 0.0, 1.0  # norm(low) <= bound < norm(high); norm(0) = 0
    for _ in range(_BISECTION_STEPS):
        mid = (low + high) / 2
        moved = None if heads is None else (heads[0], towards_head(heads[0], heads[1], mid))
        if update_norm(start, _towards(start, trained, mid), moved) <= bound:
            low = mid
        else:
            high = mid
    return _towards(start, trained, low), low


@dataclass(frozen=True)
class UpdateBound:
    """What :func:`bound_updates` decided for one client: ``"keep"``, ``"clip"`` (to ``bound``) or ``"reject"``."""

    action: str
    norm: float
    bound: float


def bound_updates(norms: dict[str, float], factor: float, mode: str) -> dict[str, UpdateBound]:
    """Each client's fate when its norm is compared with ``factor`` x the median of ``norms``.

    ``mode`` ``"clip"`` or ``"reject"`` applies to norms above the bound (and to non-finite ones, always
    rejected); the others are kept. With fewer than three clients the median says little: all are kept
    unless non-finite.
    """
    if mode not in ("clip", "reject"):
        raise ValueError(f"update bound mode must be clip or reject, got {mode!r}")
    if not factor >= 1:
        raise ValueError(f"update bound factor must be >= 1 (a multiple of the median), got {factor}")
    finite = [v for v in norms.values() if math.isfinite(v)]
    bound = factor * statistics.median(finite) if len(finite) >= 3 else math.inf
    out = {}
    for cid, value in norms.items():
        if not math.isfinite(value):
            out[cid] = UpdateBound("reject", value, bound)
        elif value > bound:
            out[cid] = UpdateBound(mode, value, bound)
        else:
            out[cid] = UpdateBound("keep", value, bound)
    return out
