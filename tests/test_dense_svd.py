"""The top singular triplets by subspace iteration, and the dense path that uses them, against dense float64.

Every expectation comes from ``torch.linalg.svd`` of the formed matrix in float64, or from a spectrum built
by hand; nothing here calls ``fedlora`` to produce a reference.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora import ClientUpdate, LoRAFactors, ModuleState, dense_svd, get_aggregator, lowrank
from fedlora.types import LowRank

pytestmark = pytest.mark.usefixtures("torch_single_thread")

TOL = {torch.float64: 1e-10, torch.float32: 2e-6}  # relative to sigma_1 / ||M||


def with_spectrum(m: int, n: int, s: list[float], seed: int) -> torch.Tensor:
    """``U diag(s) V^T`` (float64) with random orthonormal ``U``, ``V``: singular values known exactly."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.linalg.qr(torch.randn(m, len(s), generator=gen, dtype=torch.float64)).Q
    v = torch.linalg.qr(torch.randn(n, len(s), generator=gen, dtype=torch.float64)).Q
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.mT


def gapped(count: int, top: int) -> list[float]:
    """``top`` large values (10 .. 5), then a tail decaying from 0.05: a clear gap after ``top``."""
    head = [10.0 - 5.0 * i / max(top - 1, 1) for i in range(top)]
    return head + [0.05 * 0.97**i for i in range(count - top)]


def best_rank(x: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_top_triplets_are_the_float64_svds_when_the_spectrum_has_a_gap(dtype):
    s = gapped(120, 5)
    x = with_spectrum(200, 150, s, seed=1).to(dtype)
    top = dense_svd.top_triplets(x, 5)
    assert top is not None and 1 <= top.steps <= dense_svd.MAX_STEPS
    x64 = x.double()
    ref_s = torch.linalg.svdvals(x64)
    assert torch.allclose(top.S, ref_s[:5], rtol=0, atol=TOL[dtype] * s[0])
    head = (top.U * top.S) @ top.Vh
    assert float((head - best_rank(x64, 5)).norm()) <= TOL[dtype] * 10 * float(x64.norm())
    # U and V orthonormal, and the residual is what it says: ||U^T M - S Vh||.
    eye = torch.eye(5, dtype=torch.float64)
    assert torch.allclose(top.U.mT @ top.U, eye, atol=1e-12)
    assert torch.allclose(top.Vh @ top.Vh.mT, eye, atol=1e-12)
    assert top.residual == pytest.approx(float((top.U.mT @ x64 - top.S[:, None] * top.Vh).norm()), rel=1e-6,
                                         abs=1e-14 * s[0])
    assert top.residual <= TOL[dtype] * s[0]


def test_top_triplets_give_up_where_there_is_no_gap_or_no_saving():
    gen = torch.Generator().manual_seed(0)
    flat = torch.randn(200, 200, generator=gen, dtype=torch.float64)  # Marchenko-Pastur: no gap anywhere
    assert dense_svd.top_triplets(flat, 5) is None
    small = with_spectrum(20, 20, gapped(20, 3), seed=2)  # the block (11 vectors) is half of min(m, n)
    assert dense_svd.top_triplets(small, 3) is None


def test_top_triplets_are_reproducible():
    x = with_spectrum(120, 100, gapped(90, 4), seed=3)
    a, b = dense_svd.top_triplets(x, 4), dense_svd.top_triplets(x, 4)
    assert torch.equal(a.U, b.U) and torch.equal(a.S, b.S) and a.residual == b.residual


def factors_with_a_gap(m: int, n: int, k: int, top: int, dtype, seed: int) -> LowRank:
    """``L R`` of inner dimension ``k``: ``top`` strong directions over a weak full-rank rest."""
    gen = torch.Generator().manual_seed(seed)
    strong = torch.randn(m, top, generator=gen, dtype=torch.float64) @ torch.randn(top, k, generator=gen,
                                                                                      dtype=torch.float64)
    left = strong + 0.01 * torch.randn(m, k, generator=gen, dtype=torch.float64)
    right = torch.randn(k, n, generator=gen, dtype=torch.float64) / math.sqrt(k)
    return LowRank(left.to(dtype), right.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("split", ["balanced", "left", "right"])
def test_dense_truncation_from_factors_is_eckart_young_and_exact(dtype, split):
    x = factors_with_a_gap(160, 120, 130, 4, dtype, seed=4)
    product = x.left @ x.right
    assert lowrank.prefers_dense(x)
    cut = lowrank.dense_truncation(product.clone(), x.rank, 4, split, factors=x)
    assert cut.tail_singular_values is None  # the top-triplets path was taken
    X = product.double()
    norm = float(X.norm())
    head, tail = cut.head.dense().double(), cut.tail.dense().double()
    assert cut.head.rank == 4
    assert float((head + tail - X).norm()) <= TOL[dtype] * 10 * norm  # head + tail is L R
    ref_s = torch.linalg.svdvals(X)
    eckart_young = math.sqrt(float(ref_s[4:].square().sum()))
    assert float((X - head).norm()) == pytest.approx(eckart_young, rel=TOL[dtype] * 100)
    assert float((head - best_rank(X, 4)).norm()) <= TOL[dtype] * 10 * norm
    assert cut.core_residual is not None and cut.core_residual <= TOL[dtype] * norm
    full = lowrank.dense_truncation(product.clone(), x.rank, 4, split)  # no factors: the full SVD as before
    assert full.tail_singular_values is not None
    assert float((full.head.dense().double() - head).norm()) <= TOL[dtype] * 10 * norm


def gapped_round(d_out: int, d_in: int, K: int, r: int, seed: int):
    """One module's global adapter and ``K`` clients drifting a little from it: a clear top ``r``."""
    gen = torch.Generator().manual_seed(seed)
    B0 = torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.1
    A0 = torch.randn(r, d_in, generator=gen, dtype=torch.float64) / math.sqrt(d_in)
    state = {"m": ModuleState(LoRAFactors(B0, A0, 2.0))}
    updates = []
    for k in range(K):
        B = B0 + 0.005 * torch.randn(d_out, r, generator=gen, dtype=torch.float64)
        A = A0 + (0.05 / math.sqrt(d_in)) * torch.randn(r, d_in, generator=gen, dtype=torch.float64)
        updates.append(ClientUpdate(f"c{k}", {"m": LoRAFactors(B, A, 2.0)}, num_examples=10 + 7 * k))
    return state, updates


@pytest.mark.parametrize("name,opts,exact", [("fra", {"fold_tail": True}, True), ("hexa", {}, True),
                                             ("fra", {}, False), ("flexlora", {}, False)])
@pytest.mark.parametrize("measure", ["core", "exact"])
def test_aggregators_on_the_top_triplets_path_match_the_dense_reference(monkeypatch, name, opts, exact,
                                                                        measure):
    """A module where ``K r`` is past the dense threshold and the mean has a gap: the aggregate takes the
    top-triplets path; exact methods apply the mean to rounding, inexact ones lose exactly its Eckart-Young
    tail, and the reported error is the dense float64 one."""
    taken = []
    real = lowrank.top_triplets
    monkeypatch.setattr(lowrank, "top_triplets", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    state, updates = gapped_round(96, 80, 20, 3, seed=5)
    assert lowrank.dense_is_cheaper(96, 80, 20 * 3)
    res = get_aggregator(name, **opts).aggregate(state, updates, 0, error_measure=measure)
    assert taken and all(t is not None for t in taken)
    ideal = sum(res.weights[u.client_id] * 2.0 * u.factors["m"].B @ u.factors["m"].A for u in updates)
    g = res.global_state["m"].factors
    applied = g.scale * g.B @ g.A + (res.corrections["m"].dense() if "m" in res.corrections else 0.0)
    start = state["m"].factors.scale * state["m"].factors.B @ state["m"].factors.A
    move = float((ideal - start).norm())
    if exact:
        assert float((ideal - applied).norm()) <= 1e-10 * float(ideal.norm())
    else:
        tail = math.sqrt(float(torch.linalg.svdvals(ideal)[3:].square().sum()))
        assert float((ideal - applied).norm()) == pytest.approx(tail, rel=1e-8)
    assert res.errors["m"] == pytest.approx(float((ideal - applied).norm()) / move, rel=1e-6, abs=1e-12)
