"""Cases checked entry by entry or against the dense reference: the Conv1D layout, hand-computed two-client
rounds, FRA's splits and its FRA -> FFA schedule, and FLoRA's merge-and-restart."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from hypothesis import given

from dense_reference import (
    DTYPES, EXACT_TOL, F64, Spec, applied, assert_exact, build, d64, dense_errors, fro, ideal, mean_update, specs,
    start
)
from fedlora import ClientUpdate, LoRAFactors, ModuleState, get_aggregator, lowrank

pytestmark = pytest.mark.usefixtures("torch_single_thread")


# ====================================================================== 5. Conv1D layout

@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
@given(spec=specs(ks=(2, 7), square=True, layouts=("conv1d",)))
def test_fedex_conv1d_square_round_folds_the_transposed_residual(dtype, spec):
    agg = get_aggregator("fedex")
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates)
    ideal_, start_ = ideal(sc, sc.data_p), start(sc)
    assert_exact(sc, res, sc.data_p)
    # The same correction folded WITHOUT the transpose is off by exactly ||R - R^T||: far beyond the
    # tolerance whenever the residual is not symmetric, so the check above catches a missing transpose.
    wrong, asym_sq = {}, 0.0
    for m in sc.names:
        g = res.global_state[m].factors
        w = d64(sc.W[m])
        if m in res.corrections:
            R = d64(res.corrections[m].left) @ d64(res.corrections[m].right)
            w = w + R  # not transposed: wrong for Conv1D storage
            asym_sq += fro(R - R.mT) ** 2
        wrong[m] = w.mT + g.scale * d64(g.B) @ d64(g.A)
    _, wrong_total, _, dens = dense_errors(ideal_, wrong, start_)
    den = math.sqrt(sum(v * v for v in dens.values()))
    assert wrong_total >= math.sqrt(asym_sq) / den - 1e-4
    if math.sqrt(asym_sq) / den > 1e-3:
        assert wrong_total > 1e-4


def test_fedex_conv1d_hand_case_needs_the_transpose():
    """2x2 weight in Conv1D storage, non-symmetric residual; checked entry by entry."""
    gs = {"c_attn": ModuleState(LoRAFactors(torch.zeros(2, 1, dtype=F64), torch.zeros(1, 2, dtype=F64), 1.0),
                                "conv1d")}
    ups = [ClientUpdate("a", {"c_attn": LoRAFactors(torch.tensor([[2.0], [0.0]], dtype=F64),
                                                    torch.tensor([[0.0, 2.0]], dtype=F64), 1.0)}, 1),
           ClientUpdate("b", {"c_attn": LoRAFactors(torch.zeros(2, 1, dtype=F64),
                                                    torch.zeros(1, 2, dtype=F64), 1.0)}, 1)]
    res = get_aggregator("fedex").aggregate(gs, ups)
    # B = (1, 0)^T, A = (0, 1): B A = [[0, 1], [0, 0]]; ideal = 1/2 [[0, 4], [0, 0]] = [[0, 2], [0, 0]];
    # residual R = [[0, 1], [0, 0]] (linear orientation); Conv1D storage gets R^T = [[0, 0], [1, 0]].
    g = res.global_state["c_attn"].factors
    assert torch.equal(g.B, torch.tensor([[1.0], [0.0]], dtype=F64))
    assert torch.equal(g.A, torch.tensor([[0.0, 1.0]], dtype=F64))
    W = torch.tensor([[10.0, 20.0], [30.0, 40.0]], dtype=F64)  # stored (d_in, d_out)
    lowrank.fold_into_weight(W, res.corrections["c_attn"], "conv1d")
    assert torch.allclose(W, torch.tensor([[10.0, 20.0], [31.0, 40.0]], dtype=F64), atol=1e-12)


# ====================================================================== 6. hand-computed rounds

def _two_clients(scale: float, sizes=(1, 3)):
    g0 = LoRAFactors(torch.zeros(2, 1, dtype=F64), torch.tensor([[1.0, 1.0]], dtype=F64), scale)
    gs = {"q": ModuleState(g0)}
    ups = [
        ClientUpdate("alice", {"q": LoRAFactors(torch.tensor([[1.0], [0.0]], dtype=F64),
                                                torch.tensor([[1.0, 2.0]], dtype=F64), scale)}, sizes[0]),
        ClientUpdate("bob", {"q": LoRAFactors(torch.tensor([[0.0], [2.0]], dtype=F64),
                                              torch.tensor([[2.0, 0.0]], dtype=F64), scale)}, sizes[1]),
    ]
    return gs, ups


def test_fedit_two_clients_by_hand():
    # Prepare: p = (1/4, 3/4), s = 2, start s B0 A0 = 0.
    gs, ups = _two_clients(2.0)
    # Execute
    res = get_aggregator("fedit").aggregate(gs, ups)
    # Assert: B = (1/4, 3/2)^T, A = (7/4, 1/2); no correction.
    g = res.global_state["q"].factors
    assert torch.allclose(g.B, torch.tensor([[0.25], [1.5]], dtype=F64), atol=1e-15)
    assert torch.allclose(g.A, torch.tensor([[1.75, 0.5]], dtype=F64), atol=1e-15)
    assert res.corrections == {}
    assert res.weights == {"alice": 0.25, "bob": 0.75}
    # ideal = s sum p B_k A_k = 2 [[1/4, 1/2], [3, 0]] = [[1/2, 1], [6, 0]];
    # applied = 2 B A = [[7/8, 1/4], [21/4, 3/2]]; difference = [[-3/8, 3/4], [3/4, -3/2]].
    num = math.sqrt(9 / 64 + 9 / 16 + 9 / 16 + 9 / 4)
    den = math.sqrt(1 / 4 + 1 + 36)
    assert res.error == pytest.approx(num / den, rel=1e-12)
    assert res.errors["q"] == pytest.approx(num / den, rel=1e-12)


def test_fedex_two_clients_by_hand():
    gs, ups = _two_clients(2.0)
    res = get_aggregator("fedex").aggregate(gs, ups)
    g = res.global_state["q"].factors
    assert torch.allclose(g.B, torch.tensor([[0.25], [1.5]], dtype=F64), atol=1e-15)
    assert torch.allclose(g.A, torch.tensor([[1.75, 0.5]], dtype=F64), atol=1e-15)
    # s R = s sum p (B_k - B)(A_k - A) = [[-3/8, 3/4], [3/4, -3/2]].
    R = res.corrections["q"].dense()
    assert torch.allclose(R, torch.tensor([[-0.375, 0.75], [0.75, -1.5]], dtype=F64), atol=1e-14)
    W = torch.tensor([[1.0, 2.0], [3.0, 4.0]], dtype=F64)
    lowrank.fold_into_weight(W, res.corrections["q"], "linear")
    assert torch.allclose(W, torch.tensor([[0.625, 2.75], [3.75, 2.5]], dtype=F64), atol=1e-14)
    # W' + s B A = W + ideal update = [[1.5, 3], [9, 4]].
    assert torch.allclose(W + 2.0 * g.B @ g.A, torch.tensor([[1.5, 3.0], [9.0, 4.0]], dtype=F64), atol=1e-14)
    assert res.error <= 1e-15
    # The residual ships as factors of inner dimension (K - 1) r = 1.
    assert res.corrections["q"].rank == 1


def test_fedit_equal_weights_orthogonal_clients_by_hand():
    gs = {"q": ModuleState(LoRAFactors(torch.zeros(2, 1, dtype=F64), torch.zeros(1, 2, dtype=F64), 1.0))}
    ups = [ClientUpdate("a", {"q": LoRAFactors(torch.tensor([[1.0], [0.0]], dtype=F64),
                                               torch.tensor([[1.0, 0.0]], dtype=F64), 1.0)}, 7),
           ClientUpdate("b", {"q": LoRAFactors(torch.tensor([[0.0], [1.0]], dtype=F64),
                                               torch.tensor([[0.0, 1.0]], dtype=F64), 1.0)}, 7)]
    res = get_aggregator("fedit").aggregate(gs, ups)
    # ideal = I/2, applied = ones/4: ||[[1/4, -1/4], [-1/4, 1/4]]|| / ||I/2|| = (1/2) / (1/sqrt 2).
    assert res.error == pytest.approx(math.sqrt(0.5), rel=1e-12)


# ================================================================ 7. FRA splits and the FRA -> FFA schedule

@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_fra_split_puts_the_singular_values_where_it_says(split):
    spec = Spec((("q", 7, 5, "linear"),), 3, (3, 3, 3), "size", 6.0, 4)
    agg = get_aggregator("fra", split=split)
    sc = build(agg, spec, F64)
    res = agg.aggregate(sc.global_state, sc.updates)
    g = res.global_state["q"].factors
    B, A, s = d64(g.B), d64(g.A), g.scale
    M = mean_update(sc, "q", sc.data_p)
    sv = torch.linalg.svdvals(M)[:3]
    eye = torch.eye(3, dtype=F64)
    if split == "left":  # (U S, V^T): A orthonormal rows
        assert torch.allclose(A @ A.mT, eye, atol=1e-10)
        assert torch.allclose(torch.linalg.svdvals(s * B), sv, rtol=1e-10)
    elif split == "right":  # (U, S V^T): B orthonormal columns up to the scale
        assert torch.allclose(B.mT @ B, eye, atol=1e-10)
        assert torch.allclose(torch.linalg.svdvals(s * A), sv, rtol=1e-10)
    else:  # balanced: s B^T B = s A A^T = diag(S)
        assert torch.allclose(s * B.mT @ B, torch.diag(sv), atol=1e-10)
        assert torch.allclose(s * A @ A.mT, torch.diag(sv), atol=1e-10)


def test_fra_then_ffa_schedule():
    spec = Spec((("q", 6, 6, "linear"), ("v", 5, 8, "conv1d")), 2, (2, 2, 1), "size", 4.0, 8)
    agg = get_aggregator("fra", ffa_after=2)
    assert agg.trains(0) == (True, True) and agg.trains(1) == (True, True)
    assert agg.trains(2) == (False, True) and agg.trains(5) == (False, True)
    first = build(agg, spec, F64)
    state, W = first.global_state, first.W
    for rnd in range(4):
        # Clients start from the current global state and train what the schedule lets them.
        sc = build(agg, replace(spec, seed=100 + rnd), F64, round_idx=rnd, global_state=state, W=W)
        res = agg.aggregate(state, sc.updates, rnd)
        _, total, _, _ = dense_errors(ideal(sc, sc.data_p), applied(sc, res), start(sc))
        if rnd < 2:  # FRA: the tail is dropped, A moves
            assert res.error > 1e-6
            assert not torch.equal(res.global_state["q"].factors.A, state["q"].factors.A)
        if rnd == 1:  # the switch: (U S, V^T) split, A has orthonormal rows
            for m in sc.names:
                A = d64(res.global_state[m].factors.A)
                assert torch.allclose(A @ A.mT, torch.eye(spec.rank, dtype=F64), atol=1e-10)
        if rnd >= 2:  # FFA phase: A frozen, B averaged, exact, only B uploaded
            for m in sc.names:
                assert torch.equal(res.global_state[m].factors.A, state[m].factors.A)
            assert total <= 1e-9 and res.error <= 1e-9
            for u in sc.updates:
                assert res.bytes_up[u.client_id] == 8 * sum(f.B.numel() for f in u.factors.values())
            assert res.corrections == {}
        state = res.global_state


@pytest.mark.parametrize("dtype", DTYPES, ids=["f64", "f32"])
def test_fra_switch_gives_orthonormal_rows_even_when_the_mean_has_low_rank(dtype):
    """One client of rank 1, global rank 3: M has rank 1, two slots of the new adapter are empty. A freezes
    after this round, so every row must still be orthonormal, and the product still the top-3 of M."""
    agg = get_aggregator("fra", ffa_after=1)
    spec = Spec((("q", 7, 6, "linear"), ("v", 5, 8, "conv1d")), 3, (1,), "uniform", 3.0, 13)
    sc = build(agg, spec, dtype)
    res = agg.aggregate(sc.global_state, sc.updates, 0)
    for m in sc.names:
        A = d64(res.global_state[m].factors.A)
        assert fro(A @ A.mT - torch.eye(3, dtype=F64)) <= 100 * EXACT_TOL[dtype]
    assert_exact(sc, res, [1.0])  # rank-1 mean, rank-3 adapter: nothing dropped


def test_fra_rejects_bad_options():
    with pytest.raises(ValueError, match="split"):
        get_aggregator("fra", split="diag")
    with pytest.raises(ValueError, match="ffa_after"):
        get_aggregator("fra", ffa_after=0)
    with pytest.raises(ValueError, match="unknown aggregation method"):
        get_aggregator("fedsgd")


# ====================================================================== 8. FLoRA

@given(spec=specs(ks=(2, 7)))
def test_flora_merges_everything_and_starts_a_fresh_adapter(spec):
    agg = get_aggregator("flora", seed=3)
    sc = build(agg, spec, F64)
    res = agg.aggregate(sc.global_state, sc.updates, 4)
    for m in sc.names:
        g, g0 = res.global_state[m].factors, sc.global_state[m].factors
        assert torch.equal(g.B, torch.zeros_like(g0.B))  # fresh adapter: B = 0
        assert g.A.shape == g0.A.shape and float(g.A.abs().sum()) > 0
        assert float(g.A.abs().max()) <= 1 / math.sqrt(g0.A.shape[1]) + 1e-12  # PEFT's bound
        # Everything is in the correction: W + correction = ideal.
        C = d64(res.corrections[m].left) @ d64(res.corrections[m].right)
        M = mean_update(sc, m, sc.data_p)
        assert fro(C - M) <= 1e-9 * fro(M)
        for u in sc.updates:  # next round: the clients' adapters are fresh too
            ad = res.client_payloads[u.client_id][m].adapter
            assert torch.equal(ad.B, torch.zeros_like(ad.B))
    # The fresh A is a function of (seed, round, module): reproducible, and new each round.
    again = get_aggregator("flora", seed=3).aggregate(sc.global_state, sc.updates, 4)
    other_round = get_aggregator("flora", seed=3).aggregate(sc.global_state, sc.updates, 5)
    for m in sc.names:
        assert torch.equal(again.global_state[m].factors.A, res.global_state[m].factors.A)
        if res.global_state[m].factors.A.numel() > 1:
            assert not torch.equal(other_round.global_state[m].factors.A, res.global_state[m].factors.A)
