"""The independent dense float64 reference the aggregation tests compare against.

Every reference here is built with dense float64 torch from the raw inputs (the frozen weight ``W``, the
global adapter, each client's trained factors and the frozen term its payload carried), never with the
helpers of the code under test. The only library calls on the reference side are
``Aggregator.payload`` (what a client starts from: an input to the round, and checked on its own in
``test_hexa.py``) and ``lowrank.fold_into_weight`` (how a correction is applied; tested against dense in
``test_lowrank.py``).

Vocabulary:

* ideal   = ``W + sum_k p_k (s_k B_k A_k + F_k)`` (linear orientation, ``F_k`` the client's frozen term);
* start   = ``W + s B0 A0``;
* applied = ``W`` folded with every correction, plus the new global ``s B A``;
* error   = ``||ideal - applied||_F / ||ideal - start||_F`` (per module, and over all modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import strategies as st

from fedlora import ClientUpdate, LoRAFactors, ModuleState, lowrank
from fedlora.types import AggregationResult, ClientPayload

F64 = torch.float64
DTYPES = [torch.float64, torch.float32]
# Exact methods: error <= 1e-9 in float64, <= 1e-5 (relative) in float32.
EXACT_TOL = {torch.float64: 1e-9, torch.float32: 1e-5}
# Agreement of a reported (inexact) error with the dense one.
REPORT_RTOL = {torch.float64: 1e-7, torch.float32: 1e-4}
REPORT_ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def d64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


def fro(t: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(t))


def to_linear(w: torch.Tensor, layout: str) -> torch.Tensor:
    """Frozen weight in ``(d_out, d_in)`` orientation (Conv1D stores the transpose)."""
    return w.mT if layout == "conv1d" else w


# ====================================================================== scenario generation

@dataclass(frozen=True)
class Spec:
    modules: tuple[tuple[str, int, int, str], ...]  # (name, d_out, d_in, layout)
    rank: int
    client_ranks: tuple[int, ...]
    weight_mode: str  # uniform | size | explicit
    alpha: float
    seed: int


@st.composite
def specs(draw, ks=(1, 2, 7), hetero: bool | None = None, square: bool | None = None,
          layouts=("linear", "conv1d"), max_rank: int = 4):
    n_mod = draw(st.integers(1, 2))
    modules = []
    for i in range(n_mod):
        sq = draw(st.booleans()) if square is None else square
        d_out = draw(st.integers(1, 12))
        d_in = d_out if sq else draw(st.integers(1, 12))
        modules.append((f"layers.{i}.attn", d_out, d_in, draw(st.sampled_from(layouts))))
    r = draw(st.integers(1, max_rank))
    K = draw(st.sampled_from(ks))
    het = draw(st.booleans()) if hetero is None else hetero
    ranks = tuple(draw(st.integers(1, r)) for _ in range(K)) if het else (r,) * K
    return Spec(
        modules=tuple(modules),
        rank=r,
        client_ranks=ranks,
        weight_mode=draw(st.sampled_from(["uniform", "size", "explicit"])),
        alpha=draw(st.sampled_from([1.0, 2.0, 16.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@dataclass
class Scenario:
    spec: Spec
    dtype: torch.dtype
    global_state: dict[str, ModuleState]
    W: dict[str, torch.Tensor]  # stored orientation, scenario dtype
    payloads: list[dict[str, ClientPayload]]
    updates: list[ClientUpdate]
    data_p: list[float]  # p_k from num_examples / weight, computed here
    round_idx: int

    @property
    def names(self) -> list[str]:
        return [m[0] for m in self.spec.modules]

    def layout(self, m: str) -> str:
        return self.global_state[m].layout


def build(agg, spec: Spec, dtype: torch.dtype, round_idx: int = 0,
          global_state: dict[str, ModuleState] | None = None,
          W: dict[str, torch.Tensor] | None = None) -> Scenario:
    """A global state, a frozen ``W`` per module (random unless given), and one trained update per client.

    Client ``k`` of rank ``r_k`` starts from ``agg.payload(global, r_k)`` and moves each factor it trains by a
    random amount (a factor the method freezes, e.g. FFA's ``A``, stays the payload's).
    """
    gen = torch.Generator().manual_seed(spec.seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=F64)

    r, alpha = spec.rank, spec.alpha
    gstate, W_new = {}, {}
    for name, d_out, d_in, layout in spec.modules:
        B0, A0 = randn(d_out, r), randn(r, d_in)
        gstate[name] = ModuleState(LoRAFactors(B0.to(dtype), A0.to(dtype), alpha / r), layout)
        shape = (d_in, d_out) if layout == "conv1d" else (d_out, d_in)
        W_new[name] = randn(*shape).to(dtype)
    gstate = gstate if global_state is None else global_state
    W = W_new if W is None else W
    train_a, train_b = agg.trains(round_idx)
    assert train_b
    K = len(spec.client_ranks)
    if spec.weight_mode == "uniform":
        sizes, weights = [50] * K, [None] * K
    elif spec.weight_mode == "size":
        sizes, weights = torch.randint(1, 1000, (K,), generator=gen).tolist(), [None] * K
    else:
        sizes = torch.randint(0, 1000, (K,), generator=gen).tolist()  # ignored: weight wins
        weights = (torch.rand(K, generator=gen, dtype=F64) * 4.9 + 0.1).tolist()
    raw = [float(w) if w is not None else float(n) for w, n in zip(weights, sizes)]
    data_p = [x / sum(raw) for x in raw]

    payloads, updates = [], []
    for k, rk in enumerate(spec.client_ranks):
        pay = agg.payload(gstate, rk, round_idx)
        factors = {}
        for name, *_ in spec.modules:
            ad = pay[name].adapter
            assert ad.rank == rk
            # alpha / r_k, computed here (not taken from the payload).
            assert math.isclose(ad.scale, alpha / rk, rel_tol=1e-12)
            move = 0.3 + 0.7 * float(torch.rand((), generator=gen, dtype=F64))
            B = d64(ad.B) + move * randn(*ad.B.shape)
            A = d64(ad.A) + move * randn(*ad.A.shape) if train_a else d64(ad.A)
            factors[name] = LoRAFactors(B.to(dtype), A.to(dtype), alpha / rk)
        hist = torch.randint(0, 20, (4,), generator=gen).to(F64) + torch.tensor([1.0, 0, 0, 0], dtype=F64)
        payloads.append(pay)
        updates.append(ClientUpdate(f"client-{k}", factors, num_examples=sizes[k], rank=rk, weight=weights[k],
                                    label_histogram=hist))
    return Scenario(spec, dtype, gstate, W, payloads, updates, data_p, round_idx)


# ====================================================================== the dense reference

def client_full(sc: Scenario, k: int, m: str) -> torch.Tensor:
    """Client ``k``'s whole update to ``W`` in module ``m``: ``s_k B_k A_k`` plus its frozen term."""
    f = sc.updates[k].factors[m]
    full = f.scale * d64(f.B) @ d64(f.A)
    frozen = sc.payloads[k][m].frozen
    if frozen is not None:
        full = full + d64(frozen.left) @ d64(frozen.right)
    return full


def mean_update(sc: Scenario, m: str, p) -> torch.Tensor:
    return sum(pk * client_full(sc, k, m) for k, pk in enumerate(p))


def ideal(sc: Scenario, p) -> dict[str, torch.Tensor]:
    return {m: to_linear(d64(sc.W[m]), sc.layout(m)) + mean_update(sc, m, p) for m in sc.names}


def start(sc: Scenario) -> dict[str, torch.Tensor]:
    out = {}
    for m in sc.names:
        g = sc.global_state[m].factors
        out[m] = to_linear(d64(sc.W[m]), sc.layout(m)) + g.scale * d64(g.B) @ d64(g.A)
    return out


def applied(sc: Scenario, res: AggregationResult) -> dict[str, torch.Tensor]:
    out = {}
    for m in sc.names:
        layout = sc.layout(m)
        assert res.global_state[m].layout == layout
        w = d64(sc.W[m]).clone()  # folded in float64: measures the aggregation, not W's storage rounding
        if m in res.corrections:
            lowrank.fold_into_weight(w, res.corrections[m], layout)
        g = res.global_state[m].factors
        out[m] = to_linear(d64(w), layout) + g.scale * d64(g.B) @ d64(g.A)
    return out


def dense_errors(ideal_: dict, applied_: dict, start_: dict) -> tuple[dict[str, float], float, dict, dict]:
    nums = {m: fro(ideal_[m] - applied_[m]) for m in ideal_}
    dens = {m: fro(ideal_[m] - start_[m]) for m in ideal_}
    per = {m: nums[m] / dens[m] for m in ideal_}
    total = math.sqrt(sum(v * v for v in nums.values())) / math.sqrt(sum(v * v for v in dens.values()))
    return per, total, nums, dens


def assert_exact(sc: Scenario, res: AggregationResult, p) -> None:
    """The applied model is the ideal one; the reported errors are the dense ones.

    float64: ``||ideal - applied|| <= 1e-9 ||ideal - start||`` per module and overall. float32: relative
    ``1e-5``, measured against the larger of the move ``||ideal - start||`` and the round's whole adapter
    update ``||ideal - W||``: float32 factors cannot resolve a move far below their own magnitude.
    """
    ideal_, applied_, start_ = ideal(sc, p), applied(sc, res), start(sc)
    per, total, nums, dens = dense_errors(ideal_, applied_, start_)
    if sc.dtype == F64:
        assert total <= 1e-9, f"dense aggregation error {total:.3e}"
        assert all(v <= 1e-9 for v in per.values()), per
    else:
        for m in sc.names:
            ref = max(dens[m], fro(ideal_[m] - to_linear(d64(sc.W[m]), sc.layout(m))))
            assert nums[m] <= 1e-5 * ref, f"{m}: relative error {nums[m] / ref:.3e}"
    # The reported error is the dense one, for the weights the method used (checked on their own).
    used = [res.weights[u.client_id] for u in sc.updates]
    per_used, total_used, _, _ = dense_errors(ideal(sc, used), applied_, start_)
    assert res.error == pytest.approx(total_used, rel=1e-6, abs=1e-12)
    for m in sc.names:
        assert res.errors[m] == pytest.approx(per_used[m], rel=1e-6, abs=1e-12)


def hexa_cosine_weights(sc: Scenario, beta: float) -> list[float]:
    """``p_k ~ n_k exp(-beta (1 - cos(U_k, Ubar)))``, ``U_k`` = client k's full update minus ``s B0 A0``
    over all modules, ``Ubar`` the data-weighted mean; dense float64."""
    K = len(sc.updates)
    U = [{m: client_full(sc, k, m) - (lambda g: g.scale * d64(g.B) @ d64(g.A))(sc.global_state[m].factors)
          for m in sc.names} for k in range(K)]
    Ubar = {m: sum(sc.data_p[k] * U[k][m] for k in range(K)) for m in sc.names}
    nbar = math.sqrt(sum(float(Ubar[m].square().sum()) for m in sc.names))
    raw = []
    for k in range(K):
        dot = sum(float((U[k][m] * Ubar[m]).sum()) for m in sc.names)
        nk = math.sqrt(sum(float(U[k][m].square().sum()) for m in sc.names))
        cos = dot / (nk * nbar)
        raw.append(sc.data_p[k] * math.exp(-beta * (1.0 - cos)))
    return [x / sum(raw) for x in raw]


def expected_weights(agg, sc: Scenario) -> list[float]:
    if agg.name == "hexa" and agg.beta > 0:
        if agg.divergence == "cosine":
            return hexa_cosine_weights(sc, agg.beta)
        return hexa_label_kl_weights([u.label_histogram.tolist() for u in sc.updates], sc.data_p, agg.beta)
    return sc.data_p


def hexa_label_kl_weights(hists: list[list[float]], data_p: list[float], beta: float) -> list[float]:
    """By hand: ``delta_k = KL(h_k / |h_k| || pooled)``, pooled = all counts together, normalised."""
    total = [sum(col) for col in zip(*hists)]
    pooled = [t / sum(total) for t in total]
    raw = []
    for h, p in zip(hists, data_p):
        q = [x / sum(h) for x in h]
        kl = sum(qi * math.log(qi / pi) for qi, pi in zip(q, pooled) if qi > 0)
        raw.append(p * math.exp(-beta * kl))
    return [x / sum(raw) for x in raw]


def assert_weights(res: AggregationResult, sc: Scenario, expected: list[float]):
    rtol = 1e-9 if sc.dtype == F64 else 1e-5
    assert list(res.weights) == [u.client_id for u in sc.updates]
    for cid, want in zip(res.weights, expected):
        got = res.weights[cid]
        assert math.isclose(got, want, rel_tol=rtol, abs_tol=1e-15), (cid, got, want)


def factor_mean(sc: Scenario, m: str, q) -> tuple[torch.Tensor, torch.Tensor]:
    """``B = sum_k q_k (s_k / s) pad(B_k)``, ``A = sum_k q_k pad(A_k)`` at the global rank, dense float64."""
    g = sc.global_state[m].factors
    B = torch.zeros(g.B.shape, dtype=F64)
    A = torch.zeros(g.A.shape, dtype=F64)
    for qk, u in zip(q, sc.updates):
        f = u.factors[m]
        B[:, : f.rank] += qk * (f.scale / g.scale) * d64(f.B)
        A[: f.rank] += qk * d64(f.A)
    return B, A
