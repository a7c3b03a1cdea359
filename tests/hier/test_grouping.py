"""Near-IID grouping: hand cases, errors, determinism, regrouping, and greedy against random groupings."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.hier import Grouping, group_clients, kl_divergence, l1_distance, mixed_histogram, regroup


def random_federation(seed: int, num_clients: int, num_classes: int, alpha: float) -> dict[str, np.ndarray]:
    """Dirichlet(alpha) label mixes with random sizes (1..300 examples)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 301, size=num_clients)
    return {f"c{i:02d}": rng.multinomial(sizes[i], rng.dirichlet([alpha] * num_classes))
            for i in range(num_clients)}


def random_groupings_mean_kl(histograms, sizes, seed: int, draws: int = 20) -> float:
    """Mean of ``mean_kl`` over random groupings with the given group sizes (in clients)."""
    rng = np.random.default_rng(seed)
    ids = list(histograms)
    values = []
    for _ in range(draws):
        perm = [ids[k] for k in rng.permutation(len(ids))]
        bounds = np.cumsum([0, *sizes])
        values.append(Grouping([perm[a:b] for a, b in zip(bounds[:-1], bounds[1:])]).mean_kl(histograms))
    return float(np.mean(values))


# --- divergences ---------------------------------------------------------------------------------------

def test_kl_divergence_hand_values():
    assert kl_divergence([10, 0], [5, 5]) == pytest.approx(math.log(2))
    assert kl_divergence([3, 1], [1, 1]) == pytest.approx(0.75 * math.log(1.5) + 0.25 * math.log(0.5))
    assert kl_divergence([0.25, 0.75], [1, 3]) == pytest.approx(0.0, abs=1e-15)  # counts or probabilities
    # a class empty in q: large but finite (q floored at eps)
    assert kl_divergence([1, 1], [1, 0]) == pytest.approx(0.5 * math.log(0.5) + 0.5 * math.log(0.5 / 1e-12))
    assert l1_distance([10, 0], [5, 5]) == pytest.approx(1.0)


def test_divergence_errors():
    with pytest.raises(ValueError, match="number of classes"):
        kl_divergence([1, 2], [1, 2, 3])
    with pytest.raises(ValueError, match="non-negative"):
        kl_divergence([1, -1], [1, 1])
    with pytest.raises(ValueError, match="empty"):
        kl_divergence([0, 0], [1, 1])
    with pytest.raises(ValueError, match="at least one"):
        mixed_histogram([])


def test_mixed_histogram_sums_counts():
    np.testing.assert_array_equal(mixed_histogram([np.array([1, 2]), np.array([3, 4])]), [4.0, 6.0])


# --- hand cases ----------------------------------------------------------------------------------------

def test_opposite_clients_are_paired():
    hists = {"a": np.array([10, 0]), "b": np.array([0, 10]), "c": np.array([10, 0]), "d": np.array([0, 10])}
    grouping = group_clients(hists, 2)
    assert grouping.as_sets() == {frozenset("ad"), frozenset("bc")}
    for group in grouping.groups:
        np.testing.assert_array_equal(mixed_histogram([hists[c] for c in group]), [10, 10])
    assert grouping.mean_kl(hists) == pytest.approx(0.0, abs=1e-12)
    assert grouping.group_of("a") == grouping.group_of("d") != grouping.group_of("b")


def test_speeds_balance_total_compute():
    # identical label mixes: only the speed term tells the groups apart
    hists = {cid: np.array([5, 5]) for cid in "abcd"}
    speeds = {"a": 4.0, "b": 1.0, "c": 4.0, "d": 1.0}
    grouping = group_clients(hists, 2, speeds=speeds)
    assert sorted(sum(speeds[c] for c in g) for g in grouping.groups) == [5.0, 5.0]
    # without speeds the tie goes to the lowest group index, pairing the two fast clients
    assert group_clients(hists, 2).as_sets() == {frozenset("ac"), frozenset("bd")}


def test_groups_keep_input_order_and_ignore_it():
    hists = random_federation(3, 12, 4, 0.3)
    grouping = group_clients(hists, 3)
    position = {cid: i for i, cid in enumerate(hists)}
    for group in grouping.groups:
        assert [position[c] for c in group] == sorted(position[c] for c in group)
    reordered = dict(reversed(list(hists.items())))
    assert group_clients(reordered, 3).as_sets() == grouping.as_sets()


def test_deterministic():
    hists = random_federation(5, 20, 6, 0.2)
    assert group_clients(hists, 4) == group_clients(hists, 4)
    assert group_clients(hists, 4, divergence="l1") == group_clients(hists, 4, divergence="l1")


@pytest.mark.parametrize("num_groups", [0, 5, -1, 2.0, True])
def test_bad_num_groups(num_groups):
    hists = {cid: np.array([1, 2]) for cid in "abcd"}
    with pytest.raises(ValueError, match="num_groups"):
        group_clients(hists, num_groups)


def test_bad_options():
    hists = {cid: np.array([1, 2]) for cid in "abcd"}
    with pytest.raises(ValueError, match="divergence"):
        group_clients(hists, 2, divergence="js")
    with pytest.raises(ValueError, match="balance"):
        group_clients(hists, 2, balance=-1.0)
    with pytest.raises(ValueError, match="no speed"):
        group_clients(hists, 2, speeds={"a": 1.0})
    with pytest.raises(ValueError, match="number of classes"):
        group_clients({**hists, "e": np.array([1, 2, 3])}, 2)
    with pytest.raises(ValueError, match="client 'e'"):
        group_clients({**hists, "e": np.array([0, 0])}, 2)
    with pytest.raises(ValueError, match="at least one client"):
        Grouping([["a"], []])
    with pytest.raises(ValueError, match="in no group"):
        Grouping([["a"], ["b"]]).group_of("z")


def test_one_group_per_client_and_one_group():
    hists = random_federation(7, 6, 3, 0.5)
    assert group_clients(hists, 6).as_sets() == {frozenset([c]) for c in hists}
    assert group_clients(hists, 1).groups == [list(hists)]


# --- regrouping ----------------------------------------------------------------------------------------

def test_regroup_only_when_clients_change():
    hists = random_federation(11, 10, 4, 0.3)
    first = group_clients(hists, 3)
    again, changed = regroup(first, hists, 3)
    assert again is first and not changed

    joined = {**hists, "new": np.array([0, 0, 0, 50])}
    second, changed = regroup(first, joined, 3)
    assert changed and "new" in second.clients
    assert second == group_clients(joined, 3)

    left = {cid: h for cid, h in hists.items() if cid != "c00"}
    third, changed = regroup(first, left, 3)
    assert changed and "c00" not in third.clients

    fewer, changed = regroup(first, hists, 2)
    assert changed and len(fewer.groups) == 2


# --- greedy against random groupings -------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), num_clients=st.integers(8, 40), num_classes=st.integers(2, 10),
       alpha=st.floats(0.05, 1.0), num_groups=st.integers(2, 5), balance=st.sampled_from([0.0, 0.1]))
def test_greedy_beats_random_groupings(seed, num_clients, num_classes, alpha, num_groups, balance):
    # balance 0 (labels only) and 0.1 (the default). A large weight trades label balance for size balance
    # on purpose: at balance=1 greedy lost to random on 2 of 1000 federations (8 clients in 5 groups of
    # very different sizes), so it is not a property of that setting.
    hists = random_federation(seed, num_clients, num_classes, alpha)
    grouping = group_clients(hists, num_groups, balance=balance)
    assert len(grouping.groups) == num_groups and all(grouping.groups)
    assert sorted(grouping.clients) == sorted(hists)

    greedy = grouping.mean_kl(hists)
    random_mean = random_groupings_mean_kl(hists, [len(g) for g in grouping.groups], seed)
    # Degenerate federations (e.g. all clients of one class, or identical mixes) give every grouping KL ~0,
    # so no strict win is possible there; anywhere else greedy must be strictly better.
    if random_mean < 1e-9:
        assert greedy <= random_mean + 1e-9
    else:
        assert greedy < random_mean
