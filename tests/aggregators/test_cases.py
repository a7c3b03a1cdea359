"""One table of hand-computed rounds that every registered method joins.

All cases share one tiny round, small enough to do on paper (``d_out = 3``, ``d_in = 2``, ``r = 1``,
``alpha = 2`` so ``s = 2``; PEFT layout, ``B`` is ``(3, 1)``, ``A`` is ``(1, 2)``)::

    start:    B0 = (0, 0, 0)^T   A0 = (1, 1)         s B0 A0 = 0
    client 1: B1 = (2, 0, 0)^T   A1 = (1, 0)   n = 1  s B1 A1 = [[4, 0], [0, 0], [0, 0]]
    client 2: B2 = (0, 1, 0)^T   A2 = (0, 2)   n = 3  s B2 A2 = [[0, 0], [0, 4], [0, 0]]

    p = (1/4, 3/4)      M = sum_k p_k s B_k A_k = [[1, 0], [0, 3], [0, 0]]   ||M - start||_F = sqrt(10)

``M`` is diagonal, so its SVD is read off: singular values 3 (on ``e2 e2^T``) and 1 (on ``e1 e1^T``); the
top-1 part is ``[[0, 0], [0, 3], [0, 0]]`` and the tail ``[[1, 0], [0, 0], [0, 0]]``.

Each case gives, worked out by hand in its comment, the new global product ``s B A``, the correction folded
into ``W`` (``None``: the method folds nothing) and the reported aggregation error
``||ideal - applied||_F / ||ideal - start||_F``. Expected values use no fedlora function; the test densifies
what ``aggregate`` returns and compares.

Adding a method: add an entry to ``CASES`` below (``test_every_registered_method_has_a_case`` fails until
you do), worked out by hand on this same round.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch

from fedlora import AGGREGATORS, ClientUpdate, LoRAFactors, ModuleState, get_aggregator

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SCALE = 2.0  # alpha / r = 2 / 1
SQRT10 = math.sqrt(10.0)
DATA_P = (0.25, 0.75)
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


@dataclass(frozen=True)
class Case:
    """One method configuration on the shared round, with its hand-computed outcome."""

    id: str
    options: dict = field(default_factory=dict)
    product: list[list[float]] | None = None  # new global s B A, (3, 2)
    correction: list[list[float]] | None = None  # folded into W (linear orientation); None: nothing
    error: float = 0.0  # reported aggregation error, overall (one module: also the per-module one)
    weights: tuple[float, float] = DATA_P  # the p_k the result reports
    round_idx: int = 0


# HEXA's default cosine weights on this round (beta = 1). Start is 0, so client k's move is
# U_k = s B_k A_k: both of norm 4, orthogonal; the data-weighted mean move is M, of norm sqrt(10).
# <U_1, M> = 4 * 1 and <U_2, M> = 4 * 3 give cos_1 = 1 / sqrt(10), cos_2 = 3 / sqrt(10).
# p'_k ~ p_k exp(-(1 - cos_k)): p'_1 / p'_2 = (1/4) / (3/4) * exp(-2 / sqrt(10)),
# so p'_1 = 1 / (1 + 3 exp(2 / sqrt(10))) (about 0.150).
_HEXA_P1 = 1.0 / (1.0 + 3.0 * math.exp(2.0 / SQRT10))
_HEXA_P2 = 1.0 - _HEXA_P1

CASES: dict[str, list[Case]] = {
    # B = p1 B1 + p2 B2 = (1/2, 3/4, 0)^T, A = p1 A1 + p2 A2 = (1/4, 3/2);
    # s B A = 2 [[1/8, 3/4], [3/16, 9/8], [0, 0]] = [[1/4, 3/2], [3/8, 9/4], [0, 0]].
    # M - s B A = [[3/4, -3/2], [-3/8, 3/4], [0, 0]], norm sqrt(9/16 + 9/4 + 9/64 + 9/16) = 15/8.
    "fedit": [Case("fedit", product=[[0.25, 1.5], [0.375, 2.25], [0, 0]], error=15 / 8 / SQRT10)],
    # A stays A0 = (1, 1) whatever the clients send (they sent A1, A2: ignored, the ideal uses A0 too);
    # B = (1/2, 3/4, 0)^T, s B A0 = [[1, 1], [3/2, 3/2], [0, 0]] = sum p_k s B_k A0: exact.
    "ffa": [Case("ffa", product=[[1, 1], [1.5, 1.5], [0, 0]])],
    # FedIT's factors; residual s sum p_k (B_k - B)(A_k - A)
    #   = 2 (1/4 (3/2, -3/4, 0)^T (3/4, -3/2) + 3/4 (-1/2, 1/4, 0)^T (-1/4, 1/2))
    #   = [[3/4, -3/2], [-3/8, 3/4], [0, 0]] = M - s B A: exact.
    "fedex": [Case("fedex", product=[[0.25, 1.5], [0.375, 2.25], [0, 0]],
                   correction=[[0.75, -1.5], [-0.375, 0.75], [0, 0]])],
    # Top-1 SVD of M; the tail (singular value 1) is dropped (error 1 / sqrt(10)) or folded (exact).
    "fra": [
        Case("fra", product=[[0, 0], [0, 3], [0, 0]], error=1 / SQRT10),
        Case("fra-fold", {"fold_tail": True}, product=[[0, 0], [0, 3], [0, 0]],
             correction=[[1, 0], [0, 0], [0, 0]]),
        Case("fra-left-split", {"split": "left"}, product=[[0, 0], [0, 3], [0, 0]], error=1 / SQRT10),
        # Round 1 of ffa_after=1 is FFA: the FFA case's numbers.
        Case("fra-ffa-phase", {"ffa_after": 1}, product=[[1, 1], [1.5, 1.5], [0, 0]], round_idx=1),
    ],
    # Everything into W: the stacked correction is M itself; the fresh adapter has B = 0 (product 0).
    "flora": [Case("flora", product=[[0, 0], [0, 0], [0, 0]], correction=[[1, 0], [0, 3], [0, 0]])],
    # Top-1 SVD of M, tail dropped: as FRA without fold.
    "flexlora": [Case("flexlora", product=[[0, 0], [0, 3], [0, 0]], error=1 / SQRT10)],
    # q_k ~ ||s B_k A_k||_F = (4, 4): q = (1/2, 1/2). B = (1, 1/2, 0)^T, A = (1/2, 1);
    # s B A = [[1, 2], [1/2, 1], [0, 0]]; M - s B A = [[0, -2], [-1/2, 2], [0, 0]], norm sqrt(33) / 2,
    # against the data-weighted ideal (reported weights stay p).
    "hetlora": [Case("hetlora", product=[[1, 2], [0.5, 1], [0, 0]], error=math.sqrt(33) / 2 / SQRT10)],
    "hexa": [
        # Weights p' (above); M' = [[4 p'_1, 0], [0, 4 p'_2], [0, 0]] with p'_2 > p'_1: top-1 is
        # the e2 part, the e1 part is folded. Exact against the ideal at p'.
        Case("hexa", product=[[0, 0], [0, 4 * _HEXA_P2], [0, 0]],
             correction=[[4 * _HEXA_P1, 0], [0, 0], [0, 0]], weights=(_HEXA_P1, _HEXA_P2)),
        # beta = 0: data weights, so FRA with the tail folded.
        Case("hexa-beta0", {"beta": 0.0}, product=[[0, 0], [0, 3], [0, 0]],
             correction=[[1, 0], [0, 0], [0, 0]]),
        # Every part off: FedEx.
        Case("hexa-all-off", {"beta": 0.0, "refactorize": False, "rank_exact": False},
             product=[[0.25, 1.5], [0.375, 2.25], [0, 0]], correction=[[0.75, -1.5], [-0.375, 0.75], [0, 0]]),
    ],
}


def the_round(dtype: torch.dtype) -> tuple[dict[str, ModuleState], list[ClientUpdate]]:
    def t(rows):
        return torch.tensor(rows, dtype=dtype)

    start = {"q": ModuleState(LoRAFactors(t([[0.0], [0.0], [0.0]]), t([[1.0, 1.0]]), SCALE))}
    updates = [
        ClientUpdate("c1", {"q": LoRAFactors(t([[2.0], [0.0], [0.0]]), t([[1.0, 0.0]]), SCALE)}, 1),
        ClientUpdate("c2", {"q": LoRAFactors(t([[0.0], [1.0], [0.0]]), t([[0.0, 2.0]]), SCALE)}, 3),
    ]
    return start, updates


def test_every_registered_method_has_a_case():
    missing = sorted(set(AGGREGATORS) - set(CASES))
    stale = sorted(set(CASES) - set(AGGREGATORS))
    assert set(CASES) == set(AGGREGATORS), (
        f"methods without a hand-computed case: {missing}; cases of no registered method: {stale}. "
        "A new method must add its entry to CASES in tests/aggregators/test_cases.py, worked out by hand "
        "on the shared round described in that file's docstring."
    )
    assert all(CASES.values()), "every method needs at least one case"


def test_the_shared_round_by_hand():
    """The numbers the cases build on: M, its norm, and that the data weights are (1/4, 3/4)."""
    start, updates = the_round(torch.float64)
    M = sum(p * SCALE * u.factors["q"].B @ u.factors["q"].A for p, u in zip(DATA_P, updates))
    assert torch.equal(M, torch.tensor([[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]], dtype=torch.float64))
    assert get_aggregator("fedit").aggregate(start, updates).weights == {"c1": 0.25, "c2": 0.75}


ALL = [(name, case) for name, cases in CASES.items() for case in cases]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize(("name", "case"), ALL, ids=[case.id for _, case in ALL])
def test_hand_computed_round(name, case, dtype):
    # Prepare
    start, updates = the_round(dtype)
    agg = get_aggregator(name, **case.options)
    tol = TOL[dtype]
    # Execute
    res = agg.aggregate(start, updates, case.round_idx)
    # Assert: weights, the new global product, the correction, the error.
    assert list(res.weights) == ["c1", "c2"]
    for cid, want in zip(("c1", "c2"), case.weights):
        assert res.weights[cid] == pytest.approx(want, rel=1e-12, abs=1e-15)
    g = res.global_state["q"].factors
    product = g.scale * g.B.double() @ g.A.double()
    want = torch.tensor(case.product, dtype=torch.float64)
    assert torch.allclose(product, want, rtol=0, atol=tol), f"s B A = {product.tolist()}"
    if case.correction is None:
        assert res.corrections == {}
    else:
        got = res.corrections["q"].dense().double()
        want_c = torch.tensor(case.correction, dtype=torch.float64)
        assert torch.allclose(got, want_c, rtol=0, atol=tol), f"correction = {got.tolist()}"
    assert res.error == pytest.approx(case.error, rel=tol, abs=tol)
    assert res.errors["q"] == pytest.approx(case.error, rel=tol, abs=tol)
    if agg.exact:
        assert case.error == 0.0, "a method that declares itself exact must have error 0 in its case"
