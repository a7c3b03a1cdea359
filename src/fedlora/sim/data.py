"""The federation's data: train and dev splits, the seeded partition, each client's local test split.

Built once per run from the config (config -> data and partition -> engine); the label histograms are saved
(JSON and PNG) next to the run's metrics.

``model.task_type=causal_lm`` reads instruction data instead (``data.text_column`` = prompt column,
``data.text_pair_column`` = response column), encodes it with the prompt masked out of the loss, and scores
the dev split by perplexity. Such data has no labels: only label-free partitions (``iid``,
``quantity_skew``) apply, and the histograms have a single bin (the client sizes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import logging
import math

import numpy as np
import torch
from torch import Tensor

from ..config import DataConfig, RunConfig
from ..data import (
    PERPLEXITY, compute_metric, encode, encode_instructions, load_instructions, load_source, primary_score,
)
from ..data.instructions import format_prompts, uses_chat_template
from ..data.readers import SUFFIXES
from ..partition import PartitionError, client_test_split, label_histograms, partition_labels, save_histograms
from .client import mean_token_loss

log = logging.getLogger("fedlora")
CAUSAL_LM = "causal_lm"
LABEL_FREE_SCHEMES = ("iid", "quantity_skew")


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
    task_type: str = "seq_cls"
    prompt_template: str = "auto"
    dev_prompts: list[str] = field(default_factory=list)  # causal LM: the formatted dev prompts (generation)
    prompt_special_tokens: bool = True  # False when a chat template writes the special tokens itself

    @property
    def dev_size(self) -> int:
        return len(self.dev_set)

    def encode(self, tokenizer, max_length: int) -> None:
        if self.task_type == CAUSAL_LM:  # right-padded; labels -100 on prompt and padding
            self.prompt_special_tokens = not uses_chat_template(tokenizer, self.prompt_template)
            self.dev_prompts = format_prompts(self.dev_set.texts, tokenizer, self.prompt_template)
            train_prompts = format_prompts(self.train_set.texts, tokenizer, self.prompt_template)
            self.train = self._encode_instructions(train_prompts, self.train_set, tokenizer, max_length, "train")
            self.dev = self._encode_instructions(self.dev_prompts, self.dev_set, tokenizer, max_length, "dev")
        else:
            self.train = encode(self.train_set, tokenizer, max_length)
            self.dev = encode(self.dev_set, tokenizer, max_length)

    def _encode_instructions(self, prompts, dataset, tokenizer, max_length: int, split: str) -> dict[str, Tensor]:
        encoded = encode_instructions(prompts, dataset.text_pairs, tokenizer, max_length,
                                      prompt_special_tokens=self.prompt_special_tokens)
        empty = int(((encoded["labels"] != -100).sum(1) == 0).sum())
        if empty:
            log.warning("%s split: %d of %d examples keep no response token within model.max_length=%d "
                        "(they add nothing to the loss)", split, empty, len(dataset), max_length)
        return encoded


def load_dataset_for(data: DataConfig, seed: int, task_type: str = "seq_cls"):
    """Train and dev splits for the configured source (task name, ``hub:owner/name`` or a file).

    A single local file without ``data.dev`` gives up a seeded 10% as the dev split. With ``data.validation_fraction``
    a seeded fraction of train is held out and evaluated on instead of dev. For ``causal_lm`` the
    source is instruction data (:func:`~fedlora.data.load_instructions`); its prompt and response columns
    are ``data.text_column`` and ``data.text_pair_column`` (default ``prompt`` and ``response``).
    """
    if task_type == CAUSAL_LM:
        columns = {"prompt_column": data.text_column, "response_column": data.text_pair_column,
                   "label_column": data.label_column}

        def load(source, split, max_examples):
            return load_instructions(source, split=split, max_examples=max_examples, seed=seed, **columns)
    else:
        columns = {
            k: v for k, v in (("text_column", data.text_column), ("text_pair_column", data.text_pair_column),
                              ("label_column", data.label_column)) if v
        }

        def load(source, split, max_examples):
            return load_source(source, split, data.data_dir, max_examples, seed, **columns)

    train = load(data.task, "train", data.max_train_examples)
    if data.validation_fraction:  # held out of training; the dev split is never read
        order = np.random.default_rng([seed, 13]).permutation(len(train))
        cut = max(1, round(len(train) * data.validation_fraction))
        held = order[:cut] if not data.max_eval_examples else order[:min(cut, data.max_eval_examples)]
        return train.subset(order[cut:]), train.subset(held)
    if data.dev:
        return train, load(data.dev, "dev", data.max_eval_examples)
    if Path(data.task).suffix.lower() in SUFFIXES:
        order = np.random.default_rng([seed, 11]).permutation(len(train))
        cut = max(1, len(train) // 10)
        dev = train.subset(order[:cut])
        if data.max_eval_examples:
            dev = dev.subset(np.arange(min(len(dev), data.max_eval_examples)))
        return train.subset(order[cut:]), dev
    return train, load(data.task, "dev", data.max_eval_examples)


def build_federated_data(cfg: RunConfig, run_dir: Path) -> FederatedData:
    causal = cfg.model.task_type == CAUSAL_LM
    part = cfg.partition
    if causal and part.scheme not in LABEL_FREE_SCHEMES and not cfg.data.label_column:  # before reading data
        raise ValueError(f"partition.scheme: {part.scheme!r} needs class labels; model.task_type=causal_lm "
                         f"data has none (use {' or '.join(LABEL_FREE_SCHEMES)}, or name a kind column in "
                         "data.label_column)")
    train_set, dev_set = load_dataset_for(cfg.data, cfg.seed, cfg.model.task_type)
    labels = np.asarray(train_set.labels)
    if train_set.is_regression:
        if part.scheme not in ("iid", "quantity_skew"):
            raise ValueError(f"partition.scheme: {part.scheme!r} needs class labels; this task is a regression")
        # Regression: bin the targets so label-aware code paths still see classes.
        labels = np.digitize(labels, np.quantile(labels, [0.25, 0.5, 0.75]))
    try:  # part.options: the scheme's keyword options; names and types checked by the config, values here
        parts = partition_labels(labels, part.num_clients, part.scheme, cfg.seed, **part.options)
    except PartitionError as err:
        raise PartitionError(f"partition: {err}") from None
    client_ids = [str(k) for k in range(part.num_clients)]
    train_idx, test_idx = {}, {}
    for cid, idx in zip(client_ids, parts):
        train_idx[cid], test_idx[cid] = client_test_split(idx, part.local_test_fraction, cfg.seed + int(cid))
        if len(train_idx[cid]) == 0:
            raise ValueError(f"partition: client {cid} has no training examples; use fewer clients or more data")
    if causal and train_set.label_names:  # the kinds of instruction named by data.label_column
        n_classes, names = len(train_set.label_names), list(train_set.label_names)
    elif causal:  # no labels: one bin, the client sizes
        n_classes, names = 1, ["examples"]
    elif train_set.is_regression:
        n_classes, names = 4, [f"q{i + 1}" for i in range(4)]
    else:
        n_classes, names = max(int(labels.max()) + 1, 1), list(train_set.label_names)
    hist = label_histograms(labels, [train_idx[c] for c in client_ids], n_classes)
    run_dir.mkdir(parents=True, exist_ok=True)
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
        task_type=cfg.model.task_type,
        prompt_template=cfg.data.prompt_template,
    )


def metric_values(data: FederatedData, logits: Tensor, labels: Tensor) -> dict[str, float]:
    """Every official metric of the task by its own name, from logits (argmax, or the value for regression):
    ``{"f1": .., "accuracy": ..}`` for MRPC and QQP, ``{"pearson": .., "spearman": ..}`` for STS-B.

    For ``perplexity`` (causal LM), ``logits`` are :func:`~fedlora.sim.client.predict`'s per-example
    ``(summed loss, target tokens)`` rows and the result is ``exp`` of the mean loss per target token
    (lower is better); ``labels`` are not needed.
    """
    if data.metric == PERPLEXITY:
        mean = mean_token_loss(logits)
        return {PERPLEXITY: float("inf") if mean > 700 else math.exp(mean)}  # NaN stays NaN
    preds = logits.squeeze(-1) if data.num_labels == 1 else logits.argmax(-1)
    return compute_metric(data.metric, preds.cpu().numpy(), torch.as_tensor(labels).cpu().numpy())


def score(data: FederatedData, logits: Tensor, labels: Tensor) -> float:
    """The task's single number: its metric, or the mean of its metrics (:func:`fedlora.data.score_name`)."""
    return primary_score(metric_values(data, logits, labels))
