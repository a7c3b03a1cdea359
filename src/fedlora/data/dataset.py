"""The in-memory text dataset every loader returns, and the raw-label -> id conversion they share."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from .errors import DataError


@dataclass
class TextDataset:
    """Texts (or text pairs) with their labels, plus what a model and an evaluator need to know.

    Parameters
    ----------
    texts : list of str
        First (or only) text of each example.
    text_pairs : list of str or None
        Second text of each example for sentence-pair tasks (MRPC, RTE, ...), else ``None``.
    labels : np.ndarray
        ``int64`` class ids, or ``float32`` scores for regression (``num_labels == 1``).
    label_names : tuple of str
        Class names in id order; empty for regression.
    num_labels : int
        Classifier outputs: number of classes, or 1 for regression.
    metric : str
        Metric name for :func:`fedlora.data.metrics.compute_metric`.
    task : str
        Task name or source the data came from (``"sst2"``, a file path, ``"hub:owner/name"``).
    """

    texts: list[str]
    text_pairs: list[str] | None
    labels: np.ndarray
    label_names: tuple[str, ...]
    num_labels: int
    metric: str
    task: str

    def __post_init__(self) -> None:
        if len(self.labels) != len(self.texts):
            raise DataError(f"{self.task}: {len(self.texts)} texts but {len(self.labels)} labels")
        if self.text_pairs is not None and len(self.text_pairs) != len(self.texts):
            raise DataError(f"{self.task}: {len(self.texts)} texts but {len(self.text_pairs)} text pairs")

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def is_regression(self) -> bool:
        """True when labels are float scores (``num_labels == 1``)."""
        return self.num_labels == 1

    def subset(self, indices: Sequence[int] | np.ndarray) -> TextDataset:
        """The examples at ``indices`` (e.g. one client's partition), in that order."""
        idx = np.asarray(indices, dtype=np.int64)
        pairs = None if self.text_pairs is None else [self.text_pairs[i] for i in idx]
        return replace(self, texts=[self.texts[i] for i in idx], text_pairs=pairs, labels=self.labels[idx])


def encode_labels(values: Sequence, label_names: Sequence[str] | None, regression: bool,
                  where: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """Turn raw labels into ids (or float scores) and the class names.

    Parameters
    ----------
    values : sequence
        Raw labels as read: class names, ids (int or digit strings) or float scores.
    label_names : sequence of str or None
        Known class names in id order. ``None`` infers them: integer values give ids ``0..max`` named
        ``"0"``, ``"1"``, ...; other strings become classes in sorted order.
    regression : bool
        Parse values as floats (STS-B); ``label_names`` is ignored.
    where : str
        File or dataset named in error messages.

    Returns
    -------
    tuple of (np.ndarray, tuple of str)
        ``int64`` ids or ``float32`` scores, and the class names (empty for regression).
    """
    raw = [v.strip() if isinstance(v, str) else v for v in values]
    if regression:
        try:
            return np.asarray([float(v) for v in raw], dtype=np.float32), ()
        except (TypeError, ValueError):
            bad = next(v for v in raw if not _is_float(v))
            raise DataError(f"{where}: regression label {bad!r} is not a number") from None
    if label_names is None:
        label_names = _infer_label_names(raw)
    lookup = {name: i for i, name in enumerate(label_names)} | {str(i): i for i in range(len(label_names))}
    ids = [_class_id(v, lookup) for v in raw]
    bad = sorted({str(v) for v, i in zip(raw, ids) if i is None or not 0 <= i < len(label_names)})
    if bad:
        raise DataError(f"{where}: unknown labels {bad[:5]}; expected one of {list(label_names)} or 0..."
                        f"{len(label_names) - 1}")
    return np.asarray(ids, dtype=np.int64), tuple(label_names)


def subsample(dataset: TextDataset, max_examples: int | None, seed: int) -> TextDataset:
    """A seeded random subset of at most ``max_examples`` examples, kept in file order."""
    if max_examples is None or max_examples >= len(dataset):
        return dataset
    if max_examples < 1:
        raise DataError(f"max_examples must be >= 1, got {max_examples}")
    keep = np.sort(np.random.default_rng(seed).choice(len(dataset), size=max_examples, replace=False))
    return dataset.subset(keep)


def _infer_label_names(raw: list) -> tuple[str, ...]:
    ints = [_as_int(v) for v in raw]
    if all(i is not None and i >= 0 for i in ints):
        return tuple(str(i) for i in range(max(ints, default=-1) + 1))
    return tuple(sorted({str(v) for v in raw}))


def _class_id(value, lookup: dict[str, int]) -> int | None:
    return lookup.get(value) if isinstance(value, str) else _as_int(value)


def _as_int(value) -> int | None:
    """An integer class id from an int, an integer-valued float (parquet, JSON) or a digit string."""
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return int(value)
    if isinstance(value, str) and value.isdigit():
        return int(value)
    return None


def _is_float(value) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
