"""Partitioners: determinism, disjointness, coverage, the skew each scheme promises, reports."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import pytest

from fedlora.partition import (
    PARTITIONERS,
    PartitionError,
    client_test_split,
    kl_to_global,
    label_histograms,
    partition_labels,
    partition_option_types,
    partition_options,
    register,
    save_histograms,
)
from fedlora.partition.base import flwr_indices

GLUE = Path(__file__).parents[1].parent / "shared" / "data" / "glue"

# 3000 examples, 4 unequal classes (40/30/20/10%), shuffled
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [1200, 900, 600, 300]))

CASES = [  # (scheme, options, covers every example)
    ("iid", {}, True),
    ("dirichlet", {"alpha": 0.5}, True),
    ("pathological", {"classes_per_client": 2}, True),
    ("quantity_skew", {"beta": 1.0}, True),
    ("quantity_skew", {"exponent": 1.5}, True),
    ("imbalanced", {"dominant_fraction": 0.8}, False),
]
IDS = [f"{s}-{'-'.join(map(str, o.values()))}" for s, o, _ in CASES]


def mean_kl(parts, labels=LABELS) -> float:
    return float(kl_to_global(label_histograms(labels, parts, int(labels.max()) + 1)).mean())


@pytest.mark.parametrize(("scheme", "options", "covers"), CASES, ids=IDS)
def test_valid_partition(scheme, options, covers):
    parts = partition_labels(LABELS, 8, scheme, seed=3, **options)
    assert len(parts) == 8 and all(len(p) > 0 and p.dtype == np.int64 for p in parts)
    flat = np.concatenate(parts)
    assert len(np.unique(flat)) == len(flat) and flat.min() >= 0 and flat.max() < len(LABELS)  # disjoint
    assert (len(flat) == len(LABELS)) if covers else (len(flat) <= len(LABELS))
    assert all(np.all(np.diff(p) > 0) for p in parts)  # sorted


@pytest.mark.parametrize(("scheme", "options", "covers"), CASES, ids=IDS)
def test_seeded(scheme, options, covers):
    first = partition_labels(LABELS, 8, scheme, seed=11, **options)
    again = partition_labels(LABELS, 8, scheme, seed=11, **options)
    other = partition_labels(LABELS, 8, scheme, seed=12, **options)
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other))


def test_registry_and_option_errors():
    assert set(PARTITIONERS) >= {"iid", "dirichlet", "pathological", "quantity_skew", "imbalanced"}
    with pytest.raises(PartitionError, match="unknown partition scheme 'shards'"):
        partition_labels(LABELS, 4, "shards")
    with pytest.raises(PartitionError, match=r"takes options \['alpha'.*unknown \['beta'\]"):
        partition_labels(LABELS, 4, "dirichlet", beta=0.1)
    with pytest.raises(PartitionError, match="num_clients must be in 1..3000"):
        partition_labels(LABELS, 3001)


def test_options_read_from_signatures():
    assert partition_options("iid") == {}
    assert partition_options("dirichlet") == {"alpha": 0.3, "min_partition_size": 1, "self_balancing": False}
    assert partition_options("quantity_skew") == {"beta": 0.3, "exponent": None, "min_partition_size": 1}
    types = partition_option_types("pathological")
    assert types == {"classes_per_client": int,
                     "class_assignment": Literal["first-deterministic", "deterministic", "random"]}
    assert partition_option_types("imbalanced") == {"dominant_fraction": float, "client_size": int | None}
    with pytest.raises(PartitionError, match="unknown partition scheme 'shards'; known: dirichlet, iid"):
        partition_options("shards")


def test_register_checks_the_signature():
    def untyped(labels, num_clients, seed=0, alpha=0.3):
        return []

    def no_default(labels, num_clients, seed, alpha: float):
        return []

    for name, fn in (("untyped", untyped), ("no_default", no_default)):
        with pytest.raises(TypeError, match="option 'alpha' needs a default and a type"):
            register(name)(fn)
    with pytest.raises(TypeError, match="must start with labels, num_clients, seed"):
        register("reordered")(lambda labels, seed, num_clients: [])
    with pytest.raises(ValueError, match="'iid' registered twice"):
        register("iid")(PARTITIONERS["iid"])
    assert not {"untyped", "no_default", "reordered"} & set(PARTITIONERS)


def test_iid_is_balanced():
    parts = partition_labels(LABELS, 7, "iid", seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1 and mean_kl(parts) < 0.02
    assert len(partition_labels(np.linspace(0, 5, 50), 5, "iid")) == 5  # regression scores are fine


def test_dirichlet_small_alpha_is_skewed():
    skewed = mean_kl(partition_labels(LABELS, 10, "dirichlet", seed=0, alpha=0.1))
    near_iid = mean_kl(partition_labels(LABELS, 10, "dirichlet", seed=0, alpha=100.0))
    assert skewed > 0.5 and near_iid < 0.02 and skewed > 20 * near_iid


def test_dirichlet_impossible_request_raises_not_loops():
    tiny = np.array([0, 1] * 15)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # Flower's resampling warnings must not escape
        with pytest.raises(PartitionError, match="raise alpha or lower num_clients"):
            partition_labels(tiny, 25, "dirichlet", seed=0, alpha=0.01)
    with pytest.raises(PartitionError, match="min_partition_size=200"):
        partition_labels(LABELS, 20, "dirichlet", min_partition_size=200)


@pytest.mark.parametrize("classes", [1, 2, 3])
@pytest.mark.parametrize("mode", ["first-deterministic", "deterministic", "random"])
def test_pathological_exact_classes(classes, mode):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "random" may leave a class out, and says so
        parts = partition_labels(LABELS, 6, "pathological", seed=1, classes_per_client=classes,
                                 class_assignment=mode)
    assert [len(np.unique(LABELS[p])) for p in parts] == [classes] * 6


def test_pathological_warns_on_unused_class():
    with pytest.warns(UserWarning, match=r"no client holds classes \[2, 3\]"):
        parts = partition_labels(LABELS, 2, "pathological", classes_per_client=1,
                                 class_assignment="deterministic", seed=0)
    assert len(np.concatenate(parts)) < len(LABELS)
    with pytest.raises(PartitionError, match="classes_per_client must be in 1..4"):
        partition_labels(LABELS, 2, "pathological", classes_per_client=5)


def test_quantity_skew_sizes_labels_iid():
    power = partition_labels(np.zeros(100), 4, "quantity_skew", exponent=1.0)
    # 1 each + 96 * [.48, .24, .16, .12] = [46.08, 23.04, 15.36, 11.52]; the spare 1 to the largest remainder
    assert [len(p) for p in power] == [47, 24, 16, 13]
    parts = partition_labels(LABELS, 6, "quantity_skew", seed=0, beta=0.3, min_partition_size=20)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 20 and sizes.max() > 3 * sizes.min() and sizes.sum() == len(LABELS)
    big = [p for p in parts if len(p) >= 300]
    assert mean_kl(big) < 0.05


def test_imbalanced_binary_alternates_ninety_ten():
    labels = np.repeat([0, 1], [600, 400])
    parts = partition_labels(labels, 3, "imbalanced", seed=0)
    hist = label_histograms(labels, parts, 2)
    # class 0 demand is 2 round(0.9 n) + (n - round(0.9 n)): 600 at n = 316 (284 + 32), 602 at n = 317
    assert hist.tolist() == [[284, 32], [32, 284], [284, 32]]
    assert hist.sum() <= len(labels)


def test_imbalanced_multiclass_and_errors():
    parts = partition_labels(LABELS, 4, "imbalanced", dominant_fraction=0.7, seed=0)
    hist = label_histograms(LABELS, parts, 4)
    # each class is demanded 0.7 n (its own client) + 3 * 0.1 n (the others) = n; class 3 has 300 examples
    assert hist.tolist() == [[210, 30, 30, 30], [30, 210, 30, 30], [30, 30, 210, 30], [30, 30, 30, 210]]
    with pytest.raises(PartitionError, match="allow at most"):
        partition_labels(LABELS, 4, "imbalanced", client_size=2000)
    with pytest.raises(PartitionError, match="needs integer class labels"):
        partition_labels(np.linspace(0, 5, 50), 2, "imbalanced")


def test_flwr_fast_path_matches_load_partition():
    from flwr_datasets.partitioner import DirichletPartitioner, PathologicalPartitioner, SizePartitioner

    order = np.random.default_rng(0).permutation(len(LABELS))
    for make in (lambda: DirichletPartitioner(5, "label", alpha=0.3, min_partition_size=1, seed=4),
                 lambda: PathologicalPartitioner(5, "label", 2, seed=4),
                 lambda: SizePartitioner([1000, 500, 1500])):
        fast = flwr_indices(make(), LABELS, order)
        slow = flwr_indices(make(), LABELS, order, read_cache=False)
        assert len(fast) == len(slow) and all(np.array_equal(a, b) for a, b in zip(fast, slow))


def test_client_test_split():
    indices = np.arange(100, 150)
    train, test = client_test_split(indices, 0.2, seed=5)
    assert len(test) == 10 and len(train) == 40
    assert np.array_equal(np.sort(np.concatenate([train, test])), indices)
    again = client_test_split(indices, 0.2, seed=5)
    assert np.array_equal(again[1], test)
    assert not np.array_equal(client_test_split(indices, 0.2, seed=6)[1], test)
    assert [len(x) for x in client_test_split([7, 8], 0.01)] == [1, 1]  # at least one held out, one kept
    assert [len(x) for x in client_test_split([7, 8, 9], 0.0)] == [3, 0]
    with pytest.raises(PartitionError):
        client_test_split(indices, 1.0)


def test_histograms_saved_as_json_and_png(tmp_path):
    parts = partition_labels(LABELS, 5, "dirichlet", seed=0, alpha=0.3)
    hist = label_histograms(LABELS, parts, 4)
    assert hist.shape == (5, 4) and hist.sum() == len(LABELS)
    assert hist.sum(axis=1).tolist() == [len(p) for p in parts]
    assert kl_to_global(np.array([[2, 2], [4, 4]])).tolist() == [0.0, 0.0]
    save_histograms(hist, tmp_path / "out" / "hist.json", tmp_path / "out" / "hist.png", ["a", "b", "c", "d"],
                    title="dirichlet 0.3")
    record = json.loads((tmp_path / "out" / "hist.json").read_text())
    assert record["counts"] == hist.tolist() and record["label_names"] == ["a", "b", "c", "d"]
    png = (tmp_path / "out" / "hist.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 2000


@pytest.mark.skipif(not (GLUE / "SST-2" / "train.tsv").is_file(), reason="shared GLUE data not found")
def test_sst2_imbalanced_split():
    from fedlora.data import load_task

    labels = load_task("sst2", data_dir=GLUE, split="train").labels
    hist = label_histograms(labels, partition_labels(labels, 3, "imbalanced", seed=0), 2)
    assert np.argmax(hist, axis=1).tolist() == [0, 1, 0]
    assert np.allclose(hist.max(axis=1) / hist.sum(axis=1), 0.9, atol=1e-3)


def test_dirichlet_tries_derived_seeds_when_flowers_redraws_miss_the_minimum():
    """Binary labels at alpha 0.1 with a minimum of 10: a seed whose 10 Flower redraws all miss it gets a
    partition from the seeds derived after it; a seed that succeeds at once keeps Flower's own draw."""
    from flwr_datasets.partitioner import DirichletPartitioner

    from fedlora.partition.base import flwr_indices

    labels = np.random.default_rng(3).permutation(np.array([0] * 9000 + [1] * 11000))

    def flower(seed):
        part = DirichletPartitioner(num_partitions=10, partition_by="label", alpha=0.1, min_partition_size=10,
                                    self_balancing=False, shuffle=True, seed=seed)
        try:
            return flwr_indices(part, labels)
        except ValueError:
            return None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        draws = {seed: flower(seed) for seed in range(12)}
        failing = next(s for s, d in draws.items() if d is None)
        passing = next(s for s, d in draws.items() if d is not None)
        rescued = partition_labels(labels, 10, "dirichlet", seed=failing, alpha=0.1, min_partition_size=10)
        kept = partition_labels(labels, 10, "dirichlet", seed=passing, alpha=0.1, min_partition_size=10)
    assert min(len(p) for p in rescued) >= 10 and sum(len(p) for p in rescued) == len(labels)
    assert all(np.array_equal(np.sort(a), np.sort(b)) for a, b in zip(kept, draws[passing], strict=True))
