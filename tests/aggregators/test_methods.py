"""The eight aggregation methods against the dense float64 reference (``dense_reference.py``): exact methods
reproduce the ideal weighted average, inexact ones report their error right, one client is exact for every
method, and exact methods stay exact over rounds."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given

from dense_reference import (
    DTYPES, EXACT_TOL, F64, REPORT_ATOL, REPORT_RTOL, Spec, applied, assert_exact, assert_weights, build,
    client_full, d64, dense_errors, expected_weights, factor_mean, fro, ideal, mean_update, specs, start, to_linear
)
from fedlora import AGGREGATORS, ClientUpdate, LoRAFactors, get_aggregator, lowrank

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ====================================================================== 1. exact methods

EXACT_CONFIGS = [
    pytest.param("ffa", {}, 0, id="ffa"),
    pytest.param("fedex", {}, 0, id="fedex"),
    pytest.param("fra", {"fold_tail": True}, 0, id="fra-fold"),
    pytest.param("fra", {"fold_tail": True, "split": "left"}, 0, id="fra-fold-left"),
    pytest.param("fra", {"fold_tail": True, "split": "right"}, 0, id="fra-fold-right"),
    pytest.param("fra", {"ffa_after": 1}, 1, id="fra-ffa-phase"),
    pytest.param("flora", {}, 0, id="flora"),
    pytest.param("hexa", {}, 0, id="hexa"),
    pytest.param("hexa", {"beta": 0.0}, 0, id="hexa-beta0"),
    pytest.param("hexa", {"beta": 5.0, "refactorize": False}, 0, id="hexa-fedex-combine"),
    pytest.param("hexa", {"beta": 2.0, "rank_exact": False}, 0, id="hexa-not-rank-exact"),
    pytest.param("hexa", {"beta": 2.0, "divergence": "label_kl"}, 0, id="hexa-label-kl"),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(("method", "options", "round_idx"), EXACT_CONFIGS)
@given(spec=specs())
def test_exact_methods_reproduce_the_ideal_weighted_average(method, options, round_idx, dtype, spec):
    agg = get_aggregator(method, **options)
    sc = build(agg, spec, dtype, round_idx)
    res = agg.aggregate(sc.global_state, sc.updates, round_idx)
    p = expected_weights(agg, sc)
    assert_weights(res, sc, p)
    assert_exact(sc, res, p)
    for m in sc.names:  # dtype and shapes are kept
        g, g0 = res.global_state[m].factors, sc.global_state[m].factors
        assert g.B.shape == g0.B.shape and g.A.shape == g0.A.shape and g.B.dtype == dtype
        assert g.scale == g0.scale


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(hetero=True))
def test_ffa_keeps_a_and_averages_b(dtype, spec):
    """FFA: ``A`` stays the global ``A`` (also with heterogeneous ranks), ``s B = sum_k p_k s_k pad(B_k)``."""
    agg = get_aggregator("ffa")
    assert agg.trains(0) == (False, True)
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    for m in sc.names:
        g0, g = sc.global_state[m].factors, res.global_state[m].factors
        assert torch.equal(g.A, g0.A)
        B, _ = factor_mean(sc, m, sc.data_p)
        assert fro(d64(g.B) - B) <= EXACT_TOL[dtype] * max(fro(B), 1.0)
    assert res.corrections == {}


def test_ffa_ignores_the_a_a_client_sends():
    spec = Spec((("q", 5, 4, "linear"),), 3, (3, 2), "size", 6.0, 11)
    agg = get_aggregator("ffa")
    sc = build(agg, spec, F64)
    tampered = [
        ClientUpdate(u.client_id, {m: LoRAFactors(f.B, f.A + 1.0, f.scale) for m, f in u.factors.items()},
                     u.num_examples, u.rank, u.weight)
        for u in sc.updates
    ]
    res = agg.aggregate(sc.global_state, tampered)
    assert torch.equal(res.global_state["q"].factors.A, sc.global_state["q"].factors.A)
    per, total, _, _ = dense_errors(ideal(sc, sc.data_p), applied(sc, res), start(sc))
    assert total <= 1e-12
    # Uplink is B only.
    for u in sc.updates:
        assert res.bytes_up[u.client_id] == 8 * u.factors["q"].B.numel()


# ================================================================= 2. inexact methods: the error is right

@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs())
def test_fedit_factors_and_error_match_dense(dtype, spec):
    agg = get_aggregator("fedit")
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    assert res.corrections == {}
    assert_weights(res, sc, sc.data_p)
    app = {}
    for m in sc.names:
        B, A = factor_mean(sc, m, sc.data_p)
        g = res.global_state[m].factors
        assert fro(d64(g.B) - B) <= EXACT_TOL[dtype] * max(fro(B), 1.0)
        assert fro(d64(g.A) - A) <= EXACT_TOL[dtype] * max(fro(A), 1.0)
        app[m] = to_linear(d64(sc.W[m]), sc.layout(m)) + g.scale * B @ A  # dense FedIT from dense means
    per, total, _, _ = dense_errors(ideal(sc, sc.data_p), app, start(sc))
    rtol, atol = REPORT_RTOL[dtype], REPORT_ATOL[dtype]
    assert res.error == pytest.approx(total, rel=rtol, abs=atol)
    for m in sc.names:
        assert res.errors[m] == pytest.approx(per[m], rel=rtol, abs=atol)
    # And the model the result actually describes has that error too.
    per2, total2, _, _ = dense_errors(ideal(sc, sc.data_p), applied(sc, res), start(sc))
    assert total2 == pytest.approx(total, rel=rtol, abs=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize("method", ["fra", "flexlora"])
@given(spec=specs())
def test_svd_methods_without_fold_drop_exactly_the_eckart_young_tail(method, dtype, spec):
    """FRA (no fold) and FlexLoRA: ``||ideal - applied||`` is the root-sum-square of the singular values of
    ``M`` past the global rank, and the reported error is that over ``||ideal - start||``."""
    agg = get_aggregator(method)
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    assert res.corrections == {}
    _, total, nums, dens = dense_errors(ideal(sc, sc.data_p), applied(sc, res), start(sc))
    rtol, atol = REPORT_RTOL[dtype], REPORT_ATOL[dtype]
    for m in sc.names:
        M = mean_update(sc, m, sc.data_p)
        s = torch.linalg.svdvals(M)
        tail = math.sqrt(float(s[spec.rank:].square().sum()))
        assert nums[m] == pytest.approx(tail, rel=rtol, abs=atol * max(fro(M), 1.0))
        assert res.errors[m] == pytest.approx(tail / dens[m], rel=rtol, abs=atol)
    assert res.error == pytest.approx(total, rel=rtol, abs=atol)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(hetero=True, ks=(2, 7)))
def test_flexlora_client_gets_its_top_rank_truncation(dtype, spec):
    agg = get_aggregator("flexlora")
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    tol = 10 * EXACT_TOL[dtype]
    for u in sc.updates:
        pay = res.client_payloads[u.client_id]
        for m in sc.names:
            M = mean_update(sc, m, sc.data_p)
            s = torch.linalg.svdvals(M)
            ad = pay[m].adapter
            assert pay[m].frozen is None and ad.rank == u.rank
            got = ad.scale * d64(ad.B) @ d64(ad.A)
            # Best rank-r_k approximation of M: its distance to M is the tail past r_k.
            tail = math.sqrt(float(s[u.rank:].square().sum()))
            assert abs(fro(M - got) - tail) <= tol * max(fro(M), 1.0)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs())
def test_hetlora_factors_and_error_match_dense(dtype, spec):
    agg = get_aggregator("hetlora")
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    assert res.corrections == {}
    # q_k ~ ||client k's update||_F over all modules.
    norms = [math.sqrt(sum(fro(client_full(sc, k, m)) ** 2 for m in sc.names))
             for k in range(len(sc.updates))]
    q = [x / sum(norms) for x in norms]
    app = {}
    for m in sc.names:
        B, A = factor_mean(sc, m, q)
        g = res.global_state[m].factors
        assert fro(d64(g.B) - B) <= 10 * EXACT_TOL[dtype] * max(fro(B), 1.0)
        assert fro(d64(g.A) - A) <= 10 * EXACT_TOL[dtype] * max(fro(A), 1.0)
        app[m] = to_linear(d64(sc.W[m]), sc.layout(m)) + g.scale * B @ A
    per, total, _, _ = dense_errors(ideal(sc, sc.data_p), app, start(sc))  # against the data-weighted ideal
    rtol, atol = REPORT_RTOL[dtype], REPORT_ATOL[dtype]
    assert res.error == pytest.approx(total, rel=rtol, abs=atol)
    for m in sc.names:
        assert res.errors[m] == pytest.approx(per[m], rel=rtol, abs=atol)


# ====================================================================== 3. K = 1 is exact for every method

ALL_CONFIGS = [
    ("fedit", {}), ("ffa", {}), ("fedex", {}), ("fra", {}), ("fra", {"fold_tail": True}), ("flora", {}),
    ("flexlora", {}), ("hetlora", {}), ("hexa", {}), ("hexa", {"rank_exact": False, "refactorize": False}),
]


def test_every_registered_method_is_covered():
    assert {name for name, _ in ALL_CONFIGS} == set(AGGREGATORS)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@pytest.mark.parametrize(("method", "options"), ALL_CONFIGS,
                         ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALL_CONFIGS)])
@given(spec=specs(ks=(1,)))
def test_single_client_is_exact_for_every_method(method, options, dtype, spec):
    agg = get_aggregator(method, **options)
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    assert res.weights == {sc.updates[0].client_id: 1.0}
    assert_exact(sc, res, [1.0])


# ====================================================================== 9. a multi-round exact trajectory

@pytest.mark.parametrize("method", ["fedex", "hexa", "flora", "ffa", "fra-fold"])
def test_exact_methods_stay_exact_over_rounds(method):
    """Three rounds, heterogeneous ranks: after each, ``W`` with every correction folded plus the global
    adapter equals the ideal average of the clients' full models of that round."""
    agg = get_aggregator("fra", fold_tail=True) if method == "fra-fold" else get_aggregator(method)
    spec = Spec((("q", 6, 6, "conv1d"), ("v", 4, 9, "linear")), 3, (3, 1, 2), "size", 8.0, 21)
    first = build(agg, spec, F64)
    state, W = first.global_state, {m: w.clone() for m, w in first.W.items()}
    for rnd in range(3):
        sc = build(agg, replace(spec, seed=50 + rnd), F64, round_idx=rnd, global_state=state,
                   W={m: w.clone() for m, w in W.items()})
        want = ideal(sc, expected_weights(agg, sc))
        res = agg.aggregate(state, sc.updates, rnd)
        for m in sc.names:
            if m in res.corrections:
                lowrank.fold_into_weight(W[m], res.corrections[m], sc.layout(m))
        state = res.global_state
        for m in sc.names:
            g = state[m].factors
            model = to_linear(d64(W[m]), sc.layout(m)) + g.scale * d64(g.B) @ d64(g.A)
            assert fro(model - want[m]) <= 1e-9 * fro(want[m] - start(sc)[m])
