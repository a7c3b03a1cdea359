"""What a round is measured by: its aggregation error against the ideal, and its bytes on the wire.

The aggregation error of a round (``METHODS.md``) is ``||ideal - applied||_F / ||ideal - start||_F`` with

* ideal   = ``W + sum_k p_k (s_k B_k A_k + F_k)`` (``F_k`` the frozen term client ``k`` held),
* applied = ``W`` plus every correction, plus the new global ``s B A``,
* start   = ``W + s B0 A0``,

per module and over all modules, all from factors (``W`` cancels, nothing dense is formed). Bytes count the
numbers that cross the wire at the global adapter's element size: uplink the factors each client trained,
downlink its next payload plus the round's corrections.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .. import lowrank
from ..types import ClientPayload, ClientUpdate, LoRAFactors, LowRank

if TYPE_CHECKING:  # base imports this module; Round is only an annotation here
    from .base import Round


def as_lowrank64(adapter: LoRAFactors | None, extra: LowRank | None = None) -> LowRank:
    """``scale * B @ A`` (plus ``extra``) as a float64 product, the scale applied in float64."""
    terms = []
    if adapter is not None:
        terms.append(LowRank(adapter.B.double() * adapter.scale, adapter.A.double()))
    if extra is not None:
        terms.append(LowRank(extra.left.double(), extra.right.double()))
    return terms[0] if len(terms) == 1 else lowrank.concat(terms)


def aggregation_errors(
    rnd: Round, new_factors: Mapping[str, LoRAFactors], corrections: Mapping[str, LowRank]
) -> tuple[dict[str, float], float, dict[str, float]]:
    """Per-module errors, the overall one, and the sums behind it, for the new adapter and ``corrections``.

    A module absent from ``corrections`` has none. The sums are ``{"error_num_sq": sum_m ||ideal -
    applied||^2, "error_den_sq": sum_m ||ideal - start||^2}`` (they ride in ``AggregationResult.info``), so a
    caller that aggregates groups of modules separately can combine the groups' overall error exactly. The
    error is measured in float64 from the stored factors: in float32 the cancellation in ``ideal - applied``
    would otherwise leave rounding noise (~1e-5 relative) in an exact method's error. With
    ``rnd.error_measure == "core"`` the numerator comes from the method's core where it recorded one
    (``rnd.core_errors``) and the denominator from the move Gram (:func:`move_gram`).
    """
    errors, num_sq, den_sq = {}, 0.0, 0.0
    for m, state in rnd.global_state.items():
        ideal = None
        num = rnd.core_errors.get(m) if rnd.error_measure == "core" else None
        if num is None:
            ideal = ideal_update(rnd, m)
            applied = [as_lowrank64(new_factors[m])]
            if m in corrections:
                applied.append(as_lowrank64(None, corrections[m]))
            num = lowrank.frobenius_norm(lowrank.concat([ideal, *applied], [1.0] + [-1.0] * len(applied)))
        den = _move_norm(rnd, m)
        if den is None:
            ideal = ideal_update(rnd, m) if ideal is None else ideal
            den = lowrank.frobenius_norm(lowrank.subtract(ideal, as_lowrank64(state.factors)))
        errors[m] = error_ratio(num, den)
        num_sq += num * num
        den_sq += den * den
    sums = {"error_num_sq": num_sq, "error_den_sq": den_sq}
    return errors, error_ratio(math.sqrt(num_sq), math.sqrt(den_sq)), sums


def _move_norm(rnd: Round, module: str) -> float | None:
    """``||ideal - start||_F = sqrt(p^T G p)`` from the move Gram when it is at hand (cached, or ``"core"``)
    and the weights sum to one (so ``ideal - start = sum_k p_k u_k``); else ``None``."""
    if module not in rnd.move_grams and rnd.error_measure != "core":
        return None
    if not _weights_sum_to_one(rnd):
        return None
    if module in rnd.move_norms:
        return rnd.move_norms[module]
    p = torch.tensor(rnd.weights, dtype=torch.float64)
    return math.sqrt(max(float(p @ move_gram(rnd, module) @ p), 0.0))


def dense_mean_update(rnd: Round, module: str) -> Tensor:
    """``M = sum_k p_k (client k's update)`` as a dense matrix, accumulated term by term.

    When every client started from the global adapter and the weights sum to one, ``M`` is formed as
    ``sum_k p_k u_k`` from the factors' changes (no cancellation) plus ``s B0 A0``: the norm of the first part
    is the error's denominator ``||ideal - start||``, recorded in ``rnd.move_norms`` on the way for free.
    """
    g = rnd.global_state[module].factors
    if not (_starts_from_global(rnd, module) and _weights_sum_to_one(rnd)):
        return lowrank.dense_sum([rnd.full(k, module) for k in range(len(rnd.updates))], rnd.weights)
    # sum_k p_k s dB_k A_k as one product of stacked factors (they are freed before the SVD, whose
    # workspace is the larger peak); then s B0 sum_k p_k dA_k. Whole-stack operations, not a loop over
    # clients: at K = 50 the per-client calls cost more than the arithmetic.
    r, K = g.rank, len(rnd.updates)
    n = g.A.shape[1]
    p = torch.tensor(rnd.weights, dtype=g.B.dtype, device=g.B.device)
    changes = torch.cat([t[module].B for t in rnd.trained], dim=1)  # (d_out, K r): [dB_1 .. dB_K] below
    changes.view(-1, K, r).sub_(g.B.unsqueeze(1)).mul_((p * g.scale).view(1, K, 1))
    stacked = torch.cat([t[module].A for t in rnd.trained], dim=0)  # (K r, d_in)
    mean_dA = torch.tensordot(p, stacked.view(K, r, n) - g.A, dims=1)
    out = changes @ stacked
    del changes, stacked
    out.addmm_(g.B, mean_dA, alpha=g.scale)
    rnd.move_norms[module] = float(torch.linalg.vector_norm(out, dtype=torch.float64))
    return out.addmm_(g.B, g.A, alpha=g.scale)


def _weights_sum_to_one(rnd: Round) -> bool:
    """Whether ``ideal - start = sum_k p_k u_k`` (the weights sum to one, to rounding)."""
    return abs(math.fsum(rnd.weights) - 1.0) <= 1e-9


def _starts_from_global(rnd: Round, module: str) -> bool:
    """Every client trained from the global adapter itself: same rank and scale, no frozen term."""
    g = rnd.global_state[module].factors
    return all(
        pay[module].frozen is None and t[module].scale == g.scale and t[module].rank == g.rank
        and (pay[module].adapter is g or (torch.equal(pay[module].adapter.B, g.B)
                                          and torch.equal(pay[module].adapter.A, g.A)))
        for pay, t in zip(rnd.payloads, rnd.trained)
    )


def move_gram(rnd: Round, module: str) -> Tensor:
    """``G[j, k] = <u_j, u_k>_F`` for the clients' moves ``u_k = s_k B_k A_k + F_k - s B0 A0`` of one module,
    float64 ``(K, K)``, cached on the round (HEXA's cosine weights and the error's denominator share it).

    When every client started from the global adapter itself (same rank and scale, no frozen term), the
    moves are written from the factors' changes, ``u_k = s (dB_k A0 + dB_k dA_k + B0 dA_k)``, so no
    difference of nearly equal products is ever formed: two Grams, of ``[dB_1 .. dB_K, B0]`` and of
    ``[dA_1; ..; dA_K; A0]``, give every inner product, in the working precision with ``"core"`` (the terms
    are at the moves' own scale) and in float64 with ``"exact"``. Otherwise one float64 Gram of
    ``[F_1 .. F_K, S]`` (each client's whole update and the start) does it.
    """
    if module in rnd.move_grams:
        return rnd.move_grams[module]
    g = rnd.global_state[module].factors
    K = len(rnd.updates)
    if _starts_from_global(rnd, module):
        work = torch.float64 if rnd.error_measure == "exact" else g.B.dtype
        r = g.rank
        left = g.B.new_empty(g.B.shape[0], (K + 1) * r, dtype=work)  # [dB_1 .. dB_K, B0]
        right = g.A.new_empty((K + 1) * r, g.A.shape[1], dtype=work)  # [dA_1; ..; dA_K; A0]
        left[:, K * r:], right[K * r:] = g.B, g.A
        B0, A0 = left[:, K * r:], right[K * r:]
        for k, t in enumerate(rnd.trained):
            torch.sub(t[module].B.to(work), B0, out=left[:, k * r:(k + 1) * r])
            torch.sub(t[module].A.to(work), A0, out=right[k * r:(k + 1) * r])
        gl = (left.mT @ left).double().reshape(K + 1, r, K + 1, r)
        gr = (right @ right.mT).double().reshape(K + 1, r, K + 1, r)
        gram = (g.scale ** 2) * _pair_sums(gl, gr, K)
    else:
        terms = [as_lowrank64(rnd.trained[k][module], rnd.payloads[k][module].frozen) for k in range(K)]
        full = lowrank.inner_matrix([*terms, as_lowrank64(g)])
        gram = full[:K, :K] - full[:K, K:] - full[K:, :K] + full[K, K]
    rnd.move_grams[module] = gram.cpu()
    return rnd.move_grams[module]


# u_k = X_k Y_base + X_k Y_k + X_base Y_k: (left block, right block) of each term, "c" the client's own.
_MOVE_TERMS = (("c", "0"), ("c", "c"), ("0", "c"))


def _pair_sums(gl: Tensor, gr: Tensor, K: int) -> Tensor:
    """``sum over the terms of u_j and of u_k`` of ``<X_a Y_b, X_c Y_d> = sum(GL[a, :, c, :] * GR[b, :, d, :])``,
    for every pair ``(j, k)``; ``gl``, ``gr`` are the Grams as ``(K + 1, r, K + 1, r)``, block ``K`` the base."""
    def pick(g4: Tensor, first: str, second: str) -> Tensor:
        g4 = g4[:K] if first == "c" else g4[K:].expand(K, *g4.shape[1:])
        return g4[:, :, :K] if second == "c" else g4[:, :, K:].expand(*g4.shape[:2], K, g4.shape[3])

    out = gl.new_zeros(K, K)
    for a, b in _MOVE_TERMS:
        for c, d in _MOVE_TERMS:
            out += torch.einsum("jikl,jikl->jk", pick(gl, a, c), pick(gr, b, d))
    return out


def ideal_update(rnd: Round, module: str) -> LowRank:
    """``sum_k p_k (s_k B_k A_k + F_k)`` of one module in float64, as one stacked product."""
    return lowrank.concat([as_lowrank64(rnd.trained[k][module], rnd.payloads[k][module].frozen)
                           for k in range(len(rnd.updates))], rnd.weights)


def rank_energy(rnd: Round, min_rank: int) -> tuple[dict[str, float], dict[str, float]]:
    """Share of the round's update energy above rank ``min_rank``, per module, and the sums behind it.

    With ``M = sum_k p_k (s_k B_k A_k + F_k) = U S V^T`` (factored SVD, float64), a module's share is
    ``sum_{i > min_rank} s_i^2 / sum_i s_i^2`` (0 for a zero update). The sums ``{"energy_above_sq",
    "energy_sq"}`` over modules give the overall share, each module weighted by its total energy. A share
    falling round after round is the collapse toward the smallest client rank (raFLoRA, 2026).
    """
    shares, above_sq, total_sq = {}, 0.0, 0.0
    for m in rnd.global_state:
        _, sv, _ = lowrank.svd(ideal_update(rnd, m))
        energy = sv.square()
        total, above = float(energy.sum()), float(energy[min_rank:].sum())
        shares[m] = above / total if total > 0 else 0.0
        above_sq += above
        total_sq += total
    return shares, {"energy_above_sq": above_sq, "energy_sq": total_sq}


def error_ratio(num: float, den: float) -> float:
    """``num / den``, with 0/0 = 0 and x/0 = inf (an update that started where the ideal is)."""
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def wire_bytes(
    updates: Sequence[ClientUpdate],
    next_payloads: Mapping[str, Mapping[str, ClientPayload]],
    corrections: Mapping[str, LowRank],
    *,
    ship_a: bool,
    itemsize: int,
) -> tuple[dict[str, int], dict[str, int]]:
    """``(bytes_up, bytes_down)`` per client id.

    Uplink: each update's ``B``, and ``A`` when it trained this round (``ship_a``). Downlink, one entry per
    client in ``next_payloads`` (none when it is empty): every correction of the round plus the client's
    next payload, whose ``A`` ships only when it trained this round (else the client already holds it).
    """
    correction_numel = sum(lowrank.wire_numel(c) for c in corrections.values())
    bytes_up = {
        u.client_id: itemsize * sum(f.B.numel() + (f.A.numel() if ship_a else 0) for f in u.factors.values())
        for u in updates
    }
    bytes_down = {
        cid: itemsize * (correction_numel + sum(_payload_numel(p, ship_a=ship_a) for p in pay.values()))
        for cid, pay in next_payloads.items()
    }
    return bytes_up, bytes_down


def _payload_numel(p: ClientPayload, *, ship_a: bool) -> int:
    # A factor that did not train this round (FFA's seeded A) is already on the client.
    n = p.adapter.B.numel() + (p.adapter.A.numel() if ship_a else 0)
    return n + (lowrank.wire_numel(p.frozen) if p.frozen is not None else 0)
