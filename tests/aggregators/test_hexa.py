"""HEXA against the dense float64 reference: its weights (cosine and label-KL, by hand and dense), its
heterogeneous-rank payloads and its options."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dense_reference import (
    DTYPES, EXACT_TOL, F64, assert_exact, assert_weights, build, d64, fro, hexa_cosine_weights,
    hexa_label_kl_weights, mean_update, specs
)
from fedlora import ClientUpdate, LoRAFactors, ModuleState, get_aggregator

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ====================================================================== 4. HEXA

@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(ks=(2, 7)), beta=st.sampled_from([0.5, 3.0, 20.0]))
def test_hexa_cosine_weights_match_dense(dtype, spec, beta):
    agg = get_aggregator("hexa", beta=beta)
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    p = hexa_cosine_weights(sc, beta)
    assert_weights(res, sc, p)
    assert sum(res.weights.values()) == pytest.approx(1.0, abs=1e-12)


def test_hexa_weights_favour_the_consensus_client():
    """Two clients move the same way, one the opposite way; equal sizes: the odd one is down-weighted."""
    d, r = 4, 1
    g = LoRAFactors(torch.zeros(d, r, dtype=F64), torch.eye(r, d, dtype=F64), 1.0)
    gs = {"m": ModuleState(g)}
    e = torch.eye(d, dtype=F64)[:, :1]
    ups = [ClientUpdate("a", {"m": LoRAFactors(e, g.A, 1.0)}, 10),
           ClientUpdate("b", {"m": LoRAFactors(e, g.A, 1.0)}, 10),
           ClientUpdate("odd", {"m": LoRAFactors(-e, g.A, 1.0)}, 10)]
    res = get_aggregator("hexa", beta=1.0).aggregate(gs, ups)
    # Ubar = e/3 e1^T: cos = 1 for a, b; -1 for odd. p ~ (1, 1, e^-2).
    z = 2 + math.exp(-2)
    assert res.weights["a"] == pytest.approx(1 / z, rel=1e-12)
    assert res.weights["odd"] == pytest.approx(math.exp(-2) / z, rel=1e-12)
    assert res.error <= 1e-12


def test_hexa_label_kl_weights_by_hand():
    hists = [[8.0, 2.0, 0.0], [1.0, 1.0, 2.0], [0.0, 5.0, 5.0]]
    sizes = [10, 40, 50]
    beta = 1.5
    # pooled = (9, 8, 7) / 24
    pooled = [9 / 24, 8 / 24, 7 / 24]
    kl = [
        0.8 * math.log(0.8 / pooled[0]) + 0.2 * math.log(0.2 / pooled[1]),
        0.25 * math.log(0.25 / pooled[0]) + 0.25 * math.log(0.25 / pooled[1])
        + 0.5 * math.log(0.5 / pooled[2]),
        0.5 * math.log(0.5 / pooled[1]) + 0.5 * math.log(0.5 / pooled[2]),
    ]
    raw = [n / 100 * math.exp(-beta * d) for n, d in zip(sizes, kl)]
    want = [x / sum(raw) for x in raw]
    assert want == pytest.approx(hexa_label_kl_weights(hists, [0.1, 0.4, 0.5], beta), rel=1e-14)

    gen = torch.Generator().manual_seed(5)
    g = LoRAFactors(torch.randn(3, 2, generator=gen, dtype=F64),
                    torch.randn(2, 4, generator=gen, dtype=F64), 0.5)
    gs = {"m": ModuleState(g)}
    ups = [
        ClientUpdate(f"c{k}", {"m": LoRAFactors(g.B + torch.randn(3, 2, generator=gen, dtype=F64),
                                                g.A + torch.randn(2, 4, generator=gen, dtype=F64), 0.5)},
                     sizes[k], label_histogram=torch.tensor(hists[k]))
        for k in range(3)
    ]
    res = get_aggregator("hexa", beta=beta, divergence="label_kl").aggregate(gs, ups)
    assert [res.weights[f"c{k}"] for k in range(3)] == pytest.approx(want, rel=1e-9)
    assert res.error <= 1e-12


def test_hexa_weights_survive_large_beta():
    """``exp(-beta * delta)`` underflows for every client at large beta; the weights must stay defined."""
    gen = torch.Generator().manual_seed(2)
    g = LoRAFactors(torch.zeros(4, 1, dtype=F64), torch.randn(1, 5, generator=gen, dtype=F64), 1.0)
    gs = {"m": ModuleState(g)}
    ups = [ClientUpdate(f"c{k}", {"m": LoRAFactors(torch.randn(4, 1, generator=gen, dtype=F64),
                                                   torch.randn(1, 5, generator=gen, dtype=F64), 1.0)}, 5)
           for k in range(4)]
    sc_like = [u.factors["m"].B @ u.factors["m"].A for u in ups]
    ubar = sum(sc_like) / 4
    cos = [float((u * ubar).sum()) / (fro(u) * fro(ubar)) for u in sc_like]
    assert min(1 - c for c in cos) * 1e4 > 800  # every exp(-beta * delta) underflows to 0.0
    res = get_aggregator("hexa", beta=1e4).aggregate(gs, ups)
    best = max(range(4), key=lambda k: cos[k])
    assert res.weights[f"c{best}"] == pytest.approx(1.0)
    assert all(math.isfinite(w) for w in res.weights.values())
    assert res.error <= 1e-12


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(ks=(1, 2, 7)))
def test_hexa_with_every_part_off_is_fedex(dtype, spec):
    hexa = get_aggregator("hexa", beta=0.0, refactorize=False, rank_exact=False)
    fedex = get_aggregator("fedex")
    sc = build(fedex, spec, dtype)
    for r in set(spec.client_ranks):  # same starting point for every rank
        ph, pf = hexa.payload(sc.global_state, r), fedex.payload(sc.global_state, r)
        for m in sc.names:
            assert ph[m].frozen is None
            assert torch.equal(ph[m].adapter.B, pf[m].adapter.B)
            assert torch.equal(ph[m].adapter.A, pf[m].adapter.A)
    a = hexa.aggregate(sc.global_state, sc.updates)
    b = fedex.aggregate(sc.global_state, sc.updates)
    assert a.weights == b.weights
    tol = EXACT_TOL[dtype]
    for m in sc.names:
        ga, gb = a.global_state[m].factors, b.global_state[m].factors
        assert torch.allclose(ga.B, gb.B, rtol=tol, atol=tol)
        assert torch.allclose(ga.A, gb.A, rtol=tol, atol=tol)
        zero = torch.zeros(ga.shape, dtype=F64)
        ca = d64(a.corrections[m].dense()) if m in a.corrections else zero
        cb = d64(b.corrections[m].dense()) if m in b.corrections else zero
        assert fro(ca - cb) <= tol * max(1.0, fro(mean_update(sc, m, sc.data_p)))
    # Both exact against the dense ideal.
    for res in (a, b):
        assert_exact(sc, res, sc.data_p)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(ks=(1,)), rk=st.integers(1, 4))
def test_hexa_heterogeneous_payload_is_exactly_the_global_model(dtype, spec, rk):
    agg = get_aggregator("hexa")
    sc = build(agg, spec, dtype)
    rk = min(rk, spec.rank)
    pay = agg.payload(sc.global_state, rk)
    for m in sc.names:
        g = sc.global_state[m].factors
        G = g.scale * d64(g.B) @ d64(g.A)
        ad, frozen = pay[m].adapter, pay[m].frozen
        assert ad.rank == rk and ad.scale == pytest.approx(spec.alpha / rk, rel=1e-12)
        trainable = ad.scale * d64(ad.B) @ d64(ad.A)
        if rk == spec.rank:
            assert frozen is None and torch.equal(ad.B, g.B) and torch.equal(ad.A, g.A)
            continue
        assert frozen is not None
        total = trainable + d64(frozen.left) @ d64(frozen.right)
        assert fro(total - G) <= EXACT_TOL[dtype] * max(fro(G), 1e-300)
        # The trainable part is the top-r_k truncation of the global update (Eckart-Young).
        s = torch.linalg.svdvals(G)
        tail = math.sqrt(float(s[rk:].square().sum()))
        assert abs(fro(G - trainable) - tail) <= 10 * EXACT_TOL[dtype] * fro(G)


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(ks=(1,)), rk=st.integers(1, 4))
def test_default_payload_is_the_first_components_at_the_client_scale(dtype, spec, rk):
    """Every other method: a rank-r_k client gets ``s B[:, :r_k] A[:r_k]`` at scale ``alpha / r_k``."""
    agg = get_aggregator("fedex")
    sc = build(agg, spec, dtype)
    rk = min(rk, spec.rank)
    pay = agg.payload(sc.global_state, rk)
    for m in sc.names:
        g = sc.global_state[m].factors
        ad = pay[m].adapter
        assert pay[m].frozen is None and ad.rank == rk
        assert ad.scale == pytest.approx(spec.alpha / rk, rel=1e-12)
        want = g.scale * d64(g.B[:, :rk]) @ d64(g.A[:rk])
        got = ad.scale * d64(ad.B) @ d64(ad.A)
        assert fro(got - want) <= EXACT_TOL[dtype] * max(fro(want), 1e-300)


def test_hexa_proximal_mu_is_carried_and_checked():
    assert get_aggregator("hexa", proximal_mu=0.25).proximal_mu == 0.25
    for bad in ({"proximal_mu": -1.0}, {"beta": -0.1}, {"beta": math.nan}, {"divergence": "l2"}):
        with pytest.raises(ValueError):
            get_aggregator("hexa", **bad)
