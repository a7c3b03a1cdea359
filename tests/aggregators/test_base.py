"""The template :meth:`Aggregator.aggregate`: its keyword options ``payloads`` and ``next_payloads``.

A round protocol computes each client's payload once, when it configures the round, and counts bytes from
the messages it serialises; these options let it hand the payloads in and skip the next round's. With the
defaults, nothing changes.
"""

from __future__ import annotations

import pytest
import torch

from fedlora import AGGREGATORS, AggregationInputError, ClientUpdate, LoRAFactors, ModuleState, get_aggregator
from fedlora.types import AggregationResult, ClientPayload

pytestmark = pytest.mark.usefixtures("torch_single_thread")

CONFIGS = [(name, {}) for name in sorted(AGGREGATORS)] + [
    ("fra", {"fold_tail": True}), ("fra", {"ffa_after": 1}), ("hexa", {"rank_exact": False}),
]
IDS = [name + "".join(f"-{k}={v}" for k, v in opts.items()) for name, opts in CONFIGS]
SHAPES = {"q": (5, 4, "linear"), "v": (3, 6, "conv1d")}
RANK = 3


def scenario(agg, client_ranks=(3, 1, 2), round_idx=0, seed=0):
    """A global state at rank 3 and one update per client, each trained from its payload."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    gs = {m: ModuleState(LoRAFactors(randn(d_out, RANK), randn(RANK, d_in), 4.0 / RANK), lay)
          for m, (d_out, d_in, lay) in SHAPES.items()}
    train_a, _ = agg.trains(round_idx)
    payloads, updates = {}, []
    for k, rk in enumerate(client_ranks):
        cid = f"c{k}"
        payloads[cid] = agg.payload(gs, rk, round_idx)
        factors = {}
        for m, p in payloads[cid].items():
            B = p.adapter.B + randn(*p.adapter.B.shape)
            A = p.adapter.A + randn(*p.adapter.A.shape) if train_a else p.adapter.A
            factors[m] = LoRAFactors(B, A, p.adapter.scale)
        updates.append(ClientUpdate(cid, factors, num_examples=10 * (k + 1), rank=rk,
                                    label_histogram=torch.tensor([k + 1.0, 2.0])))
    return gs, updates, payloads


def assert_same(a: AggregationResult, b: AggregationResult, *, down: bool = True) -> None:
    """Bit for bit: global state, corrections, weights, bytes up, errors (and payloads, bytes down)."""
    assert a.global_state.keys() == b.global_state.keys()
    for m, s in a.global_state.items():
        t = b.global_state[m]
        assert s.layout == t.layout and s.factors.scale == t.factors.scale
        assert torch.equal(s.factors.B, t.factors.B) and torch.equal(s.factors.A, t.factors.A)
    assert a.corrections.keys() == b.corrections.keys()
    for m, c in a.corrections.items():
        assert torch.equal(c.left, b.corrections[m].left) and torch.equal(c.right, b.corrections[m].right)
    assert a.weights == b.weights and a.bytes_up == b.bytes_up
    assert a.errors == b.errors and a.error == b.error
    if down:
        assert a.bytes_down == b.bytes_down
        assert a.client_payloads.keys() == b.client_payloads.keys()
        for cid, pay in a.client_payloads.items():
            for m, p in pay.items():
                q = b.client_payloads[cid][m]
                assert torch.equal(p.adapter.B, q.adapter.B) and torch.equal(p.adapter.A, q.adapter.A)
                assert (p.frozen is None) == (q.frozen is None)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_given_payloads_give_the_same_round(name, options):
    agg = get_aggregator(name, **options)
    round_idx = 1 if "ffa_after" in options else 0
    gs, updates, payloads = scenario(agg, round_idx=round_idx)
    default = agg.aggregate(gs, updates, round_idx)
    given = agg.aggregate(gs, updates, round_idx, payloads=payloads)
    assert_same(default, given)


@pytest.mark.parametrize(("name", "options"), CONFIGS, ids=IDS)
def test_without_next_payloads_nothing_else_changes(name, options):
    agg = get_aggregator(name, **options)
    gs, updates, payloads = scenario(agg)
    full = agg.aggregate(gs, updates)
    lean = agg.aggregate(gs, updates, payloads=payloads, next_payloads=False)
    assert lean.client_payloads == {} and lean.bytes_down == {}
    assert full.client_payloads and full.bytes_down
    assert_same(full, lean, down=False)


def test_given_payloads_and_no_next_payloads_call_payload_never(monkeypatch):
    agg = get_aggregator("hexa")
    gs, updates, payloads = scenario(agg)
    calls = []
    original = agg.payload
    monkeypatch.setattr(agg, "payload", lambda *a, **k: calls.append(a) or original(*a, **k))
    agg.aggregate(gs, updates, payloads=payloads, next_payloads=False)
    assert calls == []
    agg.aggregate(gs, updates, payloads=payloads)  # next payloads: one per client
    assert len(calls) == len(updates)
    agg.aggregate(gs, updates)  # the default: both
    assert len(calls) == 3 * len(updates)


def test_given_payloads_are_what_the_round_uses():
    """FFA takes each client's ``A`` from its payload, not from what it sent: a different payload ``A``
    changes the result, so the given payloads are used, not recomputed."""
    agg = get_aggregator("ffa")
    gs, updates, payloads = scenario(agg, client_ranks=(3, 3))
    default = agg.aggregate(gs, updates)
    doubled = {cid: {m: ClientPayload(LoRAFactors(p.adapter.B, 2 * p.adapter.A, p.adapter.scale))
                     for m, p in pay.items()} for cid, pay in payloads.items()}
    res = agg.aggregate(gs, updates, payloads=doubled)
    assert res.error > 0.1  # the server's own A (unchanged) no longer matches what the clients trained on
    assert default.error < 1e-12


def test_extra_payloads_are_ignored():
    agg = get_aggregator("fedex")
    gs, updates, payloads = scenario(agg)
    res = agg.aggregate(gs, updates[:2], payloads=payloads)  # c2 sampled but dropped out
    assert_same(agg.aggregate(gs, updates[:2]), res)


def test_a_missing_payload_names_the_client():
    agg = get_aggregator("fedex")
    gs, updates, payloads = scenario(agg)
    del payloads["c1"]
    with pytest.raises(AggregationInputError, match="client 'c1'.*no payload") as info:
        agg.aggregate(gs, updates, payloads=payloads)
    assert info.value.client_id == "c1"


def test_a_payload_of_the_wrong_rank_or_modules_names_client_and_module():
    agg = get_aggregator("fedex")
    gs, updates, payloads = scenario(agg)
    wrong_rank = dict(payloads)
    wrong_rank["c2"] = agg.payload(gs, 3)  # c2 trained rank 2
    with pytest.raises(AggregationInputError, match="client 'c2'.*module 'q'.*rank 3") as info:
        agg.aggregate(gs, updates, payloads=wrong_rank)
    assert info.value.module == "q"
    missing_module = dict(payloads)
    missing_module["c0"] = {"q": payloads["c0"]["q"]}
    with pytest.raises(AggregationInputError, match="client 'c0'.*module 'v'.*missing"):
        agg.aggregate(gs, updates, payloads=missing_module)
    not_a_payload = dict(payloads)
    not_a_payload["c0"] = {m: p.adapter for m, p in payloads["c0"].items()}
    with pytest.raises(AggregationInputError, match="client 'c0'.*ClientPayload"):
        agg.aggregate(gs, updates, payloads=not_a_payload)


def test_the_options_are_keyword_only():
    agg = get_aggregator("fedit")
    gs, updates, payloads = scenario(agg)
    with pytest.raises(TypeError):
        agg.aggregate(gs, updates, 0, payloads)


def test_info_carries_the_error_sums_so_module_groups_combine():
    """A protocol that aggregates groups of modules separately gets the whole round's error back from the
    groups' ``error_num_sq`` / ``error_den_sq``."""
    agg = get_aggregator("fedit")
    gs, updates, _ = scenario(agg, client_ranks=(3, 3))
    whole = agg.aggregate(gs, updates)
    assert set(whole.info) == {"error_num_sq", "error_den_sq"}
    ratio = (whole.info["error_num_sq"] / whole.info["error_den_sq"]) ** 0.5
    assert whole.error == pytest.approx(ratio, rel=1e-12)
    num = den = 0.0
    for m in gs:
        part = agg.aggregate({m: gs[m]}, [ClientUpdate(u.client_id, {m: u.factors[m]}, u.num_examples, u.rank)
                                          for u in updates])
        assert part.errors[m] == pytest.approx(whole.errors[m], rel=1e-12)
        num, den = num + part.info["error_num_sq"], den + part.info["error_den_sq"]
    assert (num / den) ** 0.5 == pytest.approx(whole.error, rel=1e-12)
    assert whole.error > 0.01
