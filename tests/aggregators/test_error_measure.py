"""``error_measure="core"``: the aggregation error from the small core and the moves' Gram, checked against
the dense float64 reference of ``dense_reference`` (ideal, applied and start formed as matrices).

The modules here are large enough next to ``K r`` for the factored path (``lowrank.prefers_dense`` false),
so the core is really used; float64 must agree with dense as the exact measure does, float32 within its
rounding.
"""

from __future__ import annotations

import math

import pytest
import torch
from dense_reference import F64, Spec, applied, build, client_full, d64, dense_errors, hexa_cosine_weights, ideal, start

from fedlora import ClientUpdate, LoRAFactors, ModuleState, get_aggregator, lowrank
from fedlora.aggregators.accounting import move_gram
from fedlora.aggregators.base import Round
from fedlora.aggregators.validation import data_weights

pytestmark = pytest.mark.usefixtures("torch_single_thread")

MODULES = (("layers.0.q", 48, 40, "linear"), ("layers.0.c_attn", 40, 64, "conv1d"))
EXACT = [("fra", {"fold_tail": True}), ("hexa", {}), ("hexa", {"beta": 0.0}), ("fedex", {}), ("ffa", {})]
INEXACT = [("fra", {}), ("flexlora", {}), ("fedit", {}), ("fra", {"split": "left"})]


SMALL = (("layers.0.q", 8, 6, "linear"), ("layers.0.c_attn", 5, 9, "conv1d"))  # K r near min(d): dense path


def scenario(agg, dtype, seed, K=3, weight_mode="size", modules=MODULES):
    spec = Spec(modules=modules, rank=3, client_ranks=(3,) * K, weight_mode=weight_mode, alpha=16.0, seed=seed)
    sc = build(agg, spec, dtype)
    dense_path = [lowrank.prefers_dense(lowrank.concat([u.factors[m].as_lowrank() for u in sc.updates]))
                  for m in sc.names]
    assert dense_path == [modules is SMALL] * len(dense_path)
    return sc


def dense_reported(sc, res):
    used = [res.weights[u.client_id] for u in sc.updates]
    return dense_errors(ideal(sc, used), applied(sc, res), start(sc))


@pytest.mark.parametrize("modules", [MODULES, SMALL], ids=["factored", "dense"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,opts", EXACT + INEXACT, ids=lambda v: str(v))
def test_core_error_equals_dense_in_float64(name, opts, seed, modules):
    agg = get_aggregator(name, **opts)
    sc = scenario(agg, F64, seed, modules=modules)
    res = agg.aggregate(sc.global_state, sc.updates, error_measure="core")
    per, total, _, _ = dense_reported(sc, res)
    assert res.error == pytest.approx(total, rel=1e-6, abs=1e-12)
    for m in sc.names:
        assert res.errors[m] == pytest.approx(per[m], rel=1e-6, abs=1e-12)


@pytest.mark.parametrize("modules", [MODULES, SMALL], ids=["factored", "dense"])
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,opts", EXACT, ids=lambda v: str(v))
def test_core_error_of_exact_methods_stays_at_float32_rounding(name, opts, seed, modules):
    agg = get_aggregator(name, **opts)
    sc = scenario(agg, torch.float32, seed, modules=modules)
    res = agg.aggregate(sc.global_state, sc.updates, error_measure="core")
    per, total, _, _ = dense_reported(sc, res)
    assert res.error <= 1e-5 and total <= 1e-5
    assert all(v <= 1e-5 for v in res.errors.values())


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name,opts", INEXACT, ids=lambda v: str(v))
def test_core_error_of_inexact_methods_matches_dense_in_float32(name, opts, seed):
    agg = get_aggregator(name, **opts)
    sc = scenario(agg, torch.float32, seed)
    res = agg.aggregate(sc.global_state, sc.updates, error_measure="core")
    per, total, _, _ = dense_reported(sc, res)
    assert total > 1e-2  # a real truncation error, not rounding
    assert res.error == pytest.approx(total, rel=1e-4)
    for m in sc.names:
        assert res.errors[m] == pytest.approx(per[m], rel=1e-4)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["f64", "f32"])
def test_core_hexa_weights_match_dense_cosine_weights(dtype):
    agg = get_aggregator("hexa", beta=3.0)
    sc = scenario(agg, dtype, seed=4, K=5)
    res = agg.aggregate(sc.global_state, sc.updates, error_measure="core")
    want = hexa_cosine_weights(sc, 3.0)
    got = [res.weights[u.client_id] for u in sc.updates]
    assert got == pytest.approx(want, rel=1e-9 if dtype == F64 else 1e-5)


def _round(state, updates, payloads, measure):
    """The round ``aggregate`` would build: each client trained from its payload, data-size weights."""
    return Round(state, updates, list(payloads), [dict(u.factors) for u in updates], data_weights(updates), 0,
                 measure)


def gram(moves) -> torch.Tensor:
    """``<u_j, u_k>_F`` of dense float64 moves."""
    return torch.tensor([[float((a * b).sum()) for b in moves] for a in moves], dtype=F64)


def dense_move_gram(sc, m) -> torch.Tensor:
    g = sc.global_state[m].factors
    s0 = g.scale * d64(g.B) @ d64(g.A)
    return gram([client_full(sc, k, m) - s0 for k in range(len(sc.updates))])


@pytest.mark.parametrize("measure", ["exact", "core"])
def test_move_gram_from_factor_changes_equals_dense(measure):
    agg = get_aggregator("hexa")
    sc = scenario(agg, F64, seed=7, K=4)
    rnd = _round(sc.global_state, sc.updates, sc.payloads, measure)
    for m in sc.names:
        want = dense_move_gram(sc, m)
        assert torch.allclose(move_gram(rnd, m), want, rtol=1e-10, atol=1e-10 * float(want.abs().max()))


def test_move_gram_with_frozen_terms_equals_dense():
    """Clients of lower rank hold a frozen term (HEXA's exact ranks): the general float64 Gram."""
    agg = get_aggregator("hexa")
    spec = Spec(modules=MODULES, rank=4, client_ranks=(4, 2, 1), weight_mode="size", alpha=8.0, seed=3)
    sc = build(agg, spec, torch.float32)
    assert any(p[m].frozen is not None for p in sc.payloads for m in sc.names)
    rnd = _round(sc.global_state, sc.updates, sc.payloads, "core")
    for m in sc.names:
        want = dense_move_gram(sc, m)
        assert torch.allclose(move_gram(rnd, m), want, rtol=1e-6, atol=1e-6 * float(want.abs().max()))


def test_small_moves_keep_their_digits_in_float32():
    """Moves 1e-4 of the adapter's size: written from the factors' changes, a float32 Gram still gives
    every inner product of moves to 1e-4 relative (a Gram of the products themselves would not)."""
    gen = torch.Generator().manual_seed(11)
    d_out, d_in, r, K = 64, 48, 4, 3
    B0, A0 = torch.randn(d_out, r, generator=gen, dtype=F64), torch.randn(r, d_in, generator=gen, dtype=F64)
    state = {"m": ModuleState(LoRAFactors(B0.float(), A0.float(), 2.0))}
    g32 = state["m"].factors
    updates = []
    for k in range(K):
        dB = 1e-4 * torch.randn(d_out, r, generator=gen, dtype=F64)
        dA = 1e-4 * torch.randn(r, d_in, generator=gen, dtype=F64)
        updates.append(ClientUpdate(f"c{k}", {"m": LoRAFactors((d64(g32.B) + dB).float(),
                                                              (d64(g32.A) + dA).float(), 2.0)}, 10 + k))
    agg = get_aggregator("hexa")
    rnd = _round(state, updates, [agg.payload(state, r) for _ in updates], "core")
    s0 = 2.0 * d64(g32.B) @ d64(g32.A)
    want = gram([2.0 * d64(u.factors["m"].B) @ d64(u.factors["m"].A) - s0 for u in updates])
    got = move_gram(rnd, "m")
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4 * float(want.diagonal().min()))


def test_unknown_error_measure_is_refused():
    agg = get_aggregator("fedit")
    sc = scenario(agg, F64, seed=0)
    with pytest.raises(ValueError, match="error_measure must be one of exact, core"):
        agg.aggregate(sc.global_state, sc.updates, error_measure="fast")


def test_core_error_with_one_client_is_zero_for_exact_methods():
    agg = get_aggregator("fra", fold_tail=True)
    sc = scenario(agg, F64, seed=5, K=1)
    res = agg.aggregate(sc.global_state, sc.updates, error_measure="core")
    assert res.error <= 1e-12 and math.isfinite(res.error)


@pytest.mark.parametrize("modules", [MODULES, SMALL], ids=["factored", "dense"])
@pytest.mark.parametrize("measure", ["exact", "core"])
def test_heterogeneous_ranks_with_frozen_terms_report_the_dense_error(modules, measure):
    """HEXA's exact ranks: clients below the global rank hold frozen terms, so the moves are not changes of
    the global factors and both paths fall back to whole updates (``dense_sum`` on the dense path)."""
    agg = get_aggregator("hexa", beta=0.5)
    spec = Spec(modules=modules, rank=3, client_ranks=(3, 2, 1), weight_mode="size", alpha=8.0, seed=9)
    sc = build(agg, spec, F64)
    res = agg.aggregate(sc.global_state, sc.updates, payloads={u.client_id: p for u, p in zip(sc.updates, sc.payloads)},
                        error_measure=measure)
    per, total, _, _ = dense_reported(sc, res)
    assert total <= 1e-9 and res.error == pytest.approx(total, rel=1e-6, abs=1e-12)
    assert [res.weights[u.client_id] for u in sc.updates] == pytest.approx(hexa_cosine_weights(sc, 0.5), rel=1e-9)
