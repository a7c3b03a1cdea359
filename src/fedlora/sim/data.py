"""The federation's data: train and dev splits, the seeded partition, each client's local test split.

Built once per run from the config (config -> data and partition -> engine); the label histograms are saved
(JSON and PNG) next to the run's metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig, RunConfig
from ..data import compute_metric, encode, load_source, primary_score
from ..data.readers import SUFFIXES
from ..partition import client_test_split, label_histograms, partition_labels, save_histograms


@dataclass
class FederatedData:
    train_set: object
    dev_set: object
    client_ids: list[str]
    train_indices: dict[str, np.ndarray]
    test_indices: dict[str, np.ndarray]
    histograms: dict[str, np.ndarray]
    num_labels: int
    metric: str
    train: dict[str, Tensor] = field(default_factory=dict)
    dev: dict[str, Tensor] = field(default_factory=dict)

    @property
    def dev_size(self) -> int:
        return len(self.dev_set)

    def encode(self, tokenizer, max_length: int) -> None:
        self.train = encode(self.train_set, tokenizer, max_length)
        self.dev = encode(self.dev_set, tokenizer, max_length)


def load_dataset_for(data: DataConfig, seed: int):
    """Train and dev splits for the configured source (task name, ``hub:owner/name`` or a file).

    A single local file without ``data.dev`` gives up a seeded 10% as the dev split.
    """
    columns = {
        k: v for k, v in (("text_column", data.text_column), ("text_pair_column", data.text_pair_column),
                          ("label_column", data.label_column)) if v
    }
    train = load_source(data.task, "train", data.data_dir, data.max_train_examples, seed, **columns)
    if data.dev:
        return train, load_source(data.dev, "dev", data.data_dir, data.max_eval_examples, seed, **columns)
    if Path(data.task).suffix.lower() in SUFFIXES:
        order = np.random.default_rng([seed, 11]).permutation(len(train))
        cut = max(1, len(train) // 10)
        dev = train.subset(order[:cut])
        if data.max_eval_examples:
            dev = dev.subset(np.arange(min(len(dev), data.max_eval_examples)))
        return train.subset(order[cut:]), dev
    return train, load_source(data.task, "dev", data.data_dir, data.max_eval_examples, seed, **columns)


def build_federated_data(cfg: RunConfig, run_dir: Path) -> FederatedData:
    train_set, dev_set = load_dataset_for(cfg.data, cfg.seed)
    labels = np.asarray(train_set.labels)
    part = cfg.partition
    opts = {
        "iid": {},
        "dirichlet": {"alpha": part.alpha},
        "pathological": {"classes_per_client": part.classes_per_client},
        "quantity_skew": {"beta": part.alpha},
        "imbalanced": {"dominant_fraction": part.dominant_fraction},
    }[part.scheme]
    if train_set.is_regression:
        if part.scheme not in ("iid", "quantity_skew"):
            raise ValueError(f"partition.scheme: {part.scheme!r} needs class labels; this task is a regression")
        # Regression: bin the targets so label-aware code paths still see classes.
        labels = np.digitize(labels, np.quantile(labels, [0.25, 0.5, 0.75]))
    parts = partition_labels(labels, part.num_clients, part.scheme, cfg.seed, **opts)
    client_ids = [str(k) for k in range(part.num_clients)]
    train_idx, test_idx = {}, {}
    for cid, idx in zip(client_ids, parts):
        train_idx[cid], test_idx[cid] = client_test_split(idx, part.local_test_fraction, cfg.seed + int(cid))
        if len(train_idx[cid]) == 0:
            raise ValueError(f"partition: client {cid} has no training examples; use fewer clients or more data")
    n_classes = max(int(labels.max()) + 1, 1) if not train_set.is_regression else 4
    hist = label_histograms(labels, [train_idx[c] for c in client_ids], n_classes)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = list(train_set.label_names) if not train_set.is_regression else [f"q{i + 1}" for i in range(4)]
    save_histograms(hist, run_dir / "label_histograms.json", run_dir / "label_histograms.png", names)
    return FederatedData(
        train_set=train_set,
        dev_set=dev_set,
        client_ids=client_ids,
        train_indices=train_idx,
        test_indices=test_idx,
        histograms={c: hist[i] for i, c in enumerate(client_ids)},
        num_labels=train_set.num_labels,
        metric=train_set.metric,
    )


def score(data: FederatedData, logits: Tensor, labels: Tensor) -> float:
    """The task's main metric from logits (argmax, or the value itself for regression)."""
    preds = logits.squeeze(-1) if data.num_labels == 1 else logits.argmax(-1)
    return primary_score(compute_metric(data.metric, preds.cpu().numpy(), torch.as_tensor(labels).cpu().numpy()))
