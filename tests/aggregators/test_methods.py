"""The eight aggregation methods against an independent dense float64 computation.

Every reference here is built with dense float64 torch from the raw inputs (the frozen weight ``W``, the
global adapter, each client's trained factors and the frozen term its payload carried), never with the
helpers of the code under test. The only library calls on the reference side are
``Aggregator.payload`` (what a client starts from: an input to the round, and checked on its own below) and
``lowrank.fold_into_weight`` (how a correction is applied; tested against dense in ``test_lowrank.py``).

Vocabulary:

* ideal   = ``W + sum_k p_k (s_k B_k A_k + F_k)`` (linear orientation, ``F_k`` the client's frozen term);
* start   = ``W + s B0 A0``;
* applied = ``W`` folded with every correction, plus the new global ``s B A``;
* error   = ``||ideal - applied||_F / ||ideal - start||_F`` (per module, and over all modules).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlora import AGGREGATORS, ClientUpdate, LoRAFactors, ModuleState, get_aggregator, lowrank
from fedlora.types import AggregationResult, ClientPayload

pytestmark = pytest.mark.usefixtures("torch_single_thread")

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
