"""Bad input to any aggregator raises a ``ValueError`` naming the client and module, never a torch error.

Every case runs against every registered method: validation is shared, and no method may reach torch with
input it has not checked.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from fedlora import AGGREGATORS, AggregationInputError, ClientUpdate, LoRAFactors, ModuleState, get_aggregator

pytestmark = pytest.mark.usefixtures("torch_single_thread")

METHODS = sorted(AGGREGATORS)
D_OUT = {"q_proj": 6, "v_proj": 5}
D_IN = {"q_proj": 4, "v_proj": 7}
RANK = 3
SCALE = 2.0


def global_state() -> dict[str, ModuleState]:
    gen = torch.Generator().manual_seed(0)
    return {
        m: ModuleState(LoRAFactors(torch.randn(D_OUT[m], RANK, generator=gen),
                                   torch.randn(RANK, D_IN[m], generator=gen), SCALE),
                       "conv1d" if m == "v_proj" else "linear")
        for m in D_OUT
    }


def good_factors(seed: int, rank: int = RANK) -> dict[str, LoRAFactors]:
    gen = torch.Generator().manual_seed(seed)
    return {m: LoRAFactors(torch.randn(D_OUT[m], rank, generator=gen),
                           torch.randn(rank, D_IN[m], generator=gen), SCALE * RANK / rank) for m in D_OUT}


def good_round() -> list[ClientUpdate]:
    return [ClientUpdate("alice", good_factors(1), 10, rank=RANK, label_histogram=torch.tensor([3.0, 1.0])),
            ClientUpdate("bob", good_factors(2), 30, rank=RANK, label_histogram=torch.tensor([1.0, 2.0]))]


def with_factor(update: ClientUpdate, module: str, **change) -> ClientUpdate:
    f = update.factors[module]
    new = {"B": f.B, "A": f.A, "scale": f.scale, **change}
    factors = dict(update.factors)
    factors[module] = LoRAFactors(new["B"], new["A"], new["scale"])
    return ClientUpdate(update.client_id, factors, update.num_examples, update.rank, update.weight,
                        update.label_histogram)


def names(client: str, module: str | None = None) -> str:
    """A regex that requires the client id and (when given) the module name in the message."""
    pattern = re.escape(f"client '{client}'")
    if module is not None:
        pattern += ".*" + re.escape(f"module '{module}'")
    return pattern


def raises_naming(client: str, module: str | None = None, what: str = ""):
    return pytest.raises(ValueError, match=names(client, module) + (".*" + what if what else ""))


@pytest.fixture(params=METHODS)
def agg(request):
    return get_aggregator(request.param)


def test_the_good_round_is_accepted(agg):
    res = agg.aggregate(global_state(), good_round())
    assert set(res.weights) == {"alice", "bob"}
    assert math.isfinite(res.error)


# ------------------------------------------------------------------ shapes and ranks

@pytest.mark.parametrize(("module", "change", "what"), [
    ("q_proj", lambda f: {"B": torch.randn(D_OUT["q_proj"] + 1, RANK)}, "shape mismatch"),   # wrong d_out
    ("v_proj", lambda f: {"A": torch.randn(RANK, D_IN["v_proj"] - 2)}, "shape mismatch"),    # wrong d_in
    ("v_proj", lambda f: {"A": f.A.mT.contiguous()[: RANK]}, "shape mismatch"),             # transposed A
    ("q_proj", lambda f: {"A": torch.randn(RANK - 1, D_IN["q_proj"])}, "shape mismatch"),   # do not chain
    ("q_proj", lambda f: {"B": f.B.flatten()}, "2-D"),                                      # 1-D factor
    ("v_proj", lambda f: {"A": f.A[None]}, "2-D"),                                          # 3-D factor
])
def test_shape_mismatch_names_client_and_module(agg, module, change, what):
    ups = good_round()
    ups[1] = with_factor(ups[1], module, **change(ups[1].factors[module]))
    with raises_naming("bob", module, what):
        agg.aggregate(global_state(), ups)


def test_transposed_a_is_a_shape_mismatch(agg):
    """A (d_in, r) A where (r, d_in) is expected."""
    ups = good_round()
    f = ups[0].factors["q_proj"]
    ups[0] = with_factor(ups[0], "q_proj", A=f.A.mT.contiguous())
    with raises_naming("alice", "q_proj", "shape mismatch"):
        agg.aggregate(global_state(), ups)


def test_rank_differing_from_the_declared_rank(agg):
    ups = good_round()
    ups[0] = ClientUpdate("alice", good_factors(1, rank=2), 10, rank=3)
    with raises_naming("alice", "q_proj", "declared rank 3"):
        agg.aggregate(global_state(), ups)


def test_rank_above_the_global_rank(agg):
    ups = good_round()
    ups[1] = ClientUpdate("bob", good_factors(2, rank=RANK + 1), 10)
    with raises_naming("bob", "q_proj", "exceeds the global rank"):
        agg.aggregate(global_state(), ups)


def test_modules_of_different_ranks_in_one_update(agg):
    ups = good_round()
    factors = good_factors(3)
    factors["v_proj"] = good_factors(3, rank=1)["v_proj"]
    ups[0] = ClientUpdate("alice", factors, 10)
    with raises_naming("alice", None, "different ranks"):
        agg.aggregate(global_state(), ups)


def test_missing_and_unexpected_modules(agg):
    ups = good_round()
    missing = dict(ups[0].factors)
    del missing["v_proj"]
    with raises_naming("alice", "v_proj", "missing"):
        agg.aggregate(global_state(), [ClientUpdate("alice", missing, 10), ups[1]])
    extra = dict(ups[1].factors)
    extra["k_proj"] = extra["q_proj"]
    with raises_naming("bob", "k_proj", "unexpected"):
        agg.aggregate(global_state(), [ups[0], ClientUpdate("bob", extra, 10)])


def test_factors_that_are_not_tensors(agg):
    ups = good_round()
    f = ups[1].factors["q_proj"]
    bad = dict(ups[1].factors)
    bad["q_proj"] = LoRAFactors(f.B.tolist(), f.A, f.scale)
    with raises_naming("bob", "q_proj"):
        agg.aggregate(global_state(), [ups[0], ClientUpdate("bob", bad, 10)])
    bad["q_proj"] = (f.B, f.A)
    with raises_naming("bob", "q_proj"):
        agg.aggregate(global_state(), [ups[0], ClientUpdate("bob", bad, 10)])


# ------------------------------------------------------------------ non-finite values

@pytest.mark.parametrize(("module", "factor", "value"), [
    ("q_proj", "B", math.nan), ("q_proj", "A", math.inf),
    ("v_proj", "B", -math.inf), ("v_proj", "A", math.nan),
])
def test_nan_or_inf_in_a_factor(agg, module, factor, value):
    ups = good_round()
    t = ups[0].factors[module].__getattribute__(factor).clone()
    t[0, -1] = value
    ups[0] = with_factor(ups[0], module, **{factor: t})
    with raises_naming("alice", module, f"{factor} contains NaN or Inf"):
        agg.aggregate(global_state(), ups)


@pytest.mark.parametrize("scale", [math.nan, math.inf, 0.0, -1.0])
def test_bad_scale(agg, scale):
    ups = good_round()
    ups[1] = with_factor(ups[1], "v_proj", scale=scale)
    with raises_naming("bob", "v_proj", "scale"):
        agg.aggregate(global_state(), ups)


def test_nan_in_a_float64_update_to_a_float32_global_state(agg):
    """The check runs before the cast, on what the client sent."""
    ups = good_round()
    B = ups[1].factors["q_proj"].B.double()
    B[2, 1] = math.nan
    ups[1] = with_factor(ups[1], "q_proj", B=B)
    with raises_naming("bob", "q_proj", "NaN"):
        agg.aggregate(global_state(), ups)


# ------------------------------------------------------------------ weights

@pytest.mark.parametrize("weight", [-0.5, math.nan, math.inf, -math.inf])
def test_bad_explicit_weight(agg, weight):
    ups = good_round()
    ups[0].weight = weight
    with raises_naming("alice", None, "weight"):
        agg.aggregate(global_state(), ups)


@pytest.mark.parametrize("n", [-1, math.nan])
def test_bad_num_examples(agg, n):
    ups = good_round()
    ups[1].num_examples = n
    with raises_naming("bob", None, "num_examples"):
        agg.aggregate(global_state(), ups)


@pytest.mark.parametrize("how", ["num_examples", "weight"])
def test_all_zero_weights_name_the_clients(agg, how):
    ups = good_round()
    for u in ups:
        if how == "num_examples":
            u.num_examples = 0
        else:
            u.weight = 0.0
    with pytest.raises(ValueError, match=r"all client weights are zero.*'alice'.*'bob'"):
        agg.aggregate(global_state(), ups)


def test_one_zero_weight_is_fine(agg):
    ups = good_round()
    ups[0].num_examples = 0
    res = agg.aggregate(global_state(), ups)
    assert res.weights["alice"] == 0.0 and res.weights["bob"] == pytest.approx(1.0)


# ------------------------------------------------------------------ the round

@pytest.mark.parametrize("empty", [[], ()])
def test_empty_round(agg, empty):
    with pytest.raises(ValueError, match="empty round"):
        agg.aggregate(global_state(), empty)


def test_empty_global_state(agg):
    with pytest.raises(ValueError, match="no modules"):
        agg.aggregate({}, good_round())


def test_client_twice_in_one_round(agg):
    ups = good_round()
    ups[1].client_id = "alice"
    with raises_naming("alice", None, "twice"):
        agg.aggregate(global_state(), ups)


def test_errors_are_aggregation_input_errors_with_fields():
    ups = good_round()
    ups[1] = with_factor(ups[1], "v_proj", B=torch.randn(D_OUT["v_proj"], RANK + 1))
    with pytest.raises(AggregationInputError) as info:
        get_aggregator("fedex").aggregate(global_state(), ups)
    assert isinstance(info.value, ValueError)
    assert info.value.client_id == "bob" and info.value.module == "v_proj"


def test_a_failing_round_leaves_the_global_state_untouched(agg):
    gs = global_state()
    before = {m: (s.factors.B.clone(), s.factors.A.clone()) for m, s in gs.items()}
    ups = good_round()
    ups[1] = with_factor(ups[1], "v_proj", A=torch.full((RANK, D_IN["v_proj"]), math.nan))
    with pytest.raises(ValueError):
        agg.aggregate(gs, ups)
    for m, (B, A) in before.items():
        assert torch.equal(gs[m].factors.B, B) and torch.equal(gs[m].factors.A, A)


# ------------------------------------------------------------------ HEXA's label histograms

@pytest.mark.parametrize(("hist", "what"), [
    (None, "needs a label_histogram"),
    (torch.tensor([1.0, math.nan]), "label_histogram"),
    (torch.tensor([1.0, -2.0]), "label_histogram"),
    (torch.tensor([0.0, 0.0]), "label_histogram"),
    (torch.tensor([1.0, 2.0, 3.0]), "label_histogram"),  # a different number of classes
])
def test_hexa_label_kl_bad_histogram(hist, what):
    ups = good_round()
    ups[1].label_histogram = hist
    with raises_naming("bob", None, what):
        get_aggregator("hexa", divergence="label_kl").aggregate(global_state(), ups)


# ------------------------------------------------------------------ method options

@pytest.mark.parametrize(("name", "options"), [
    ("fra", {"split": "middle"}), ("fra", {"ffa_after": 0}), ("hexa", {"beta": -1.0}),
    ("hexa", {"divergence": "js"}), ("hexa", {"proximal_mu": math.inf}), ("no-such-method", {}),
])
def test_bad_options(name, options):
    with pytest.raises(ValueError):
        get_aggregator(name, **options)
