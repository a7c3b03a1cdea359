"""GLUE's official metrics as pure numpy functions (no sklearn, no scipy).

``compute_metric(name, predictions, labels)`` returns what GLUE reports for a task: ``accuracy``;
``matthews_corrcoef`` (CoLA); ``f1`` *and* ``accuracy`` (MRPC, QQP); ``pearson`` *and* ``spearman``
(STS-B). A task's single score is the mean of those values (:func:`primary_score`), as on the GLUE board,
named by :func:`score_name` (``mean(f1,accuracy)``).
Degenerate inputs follow sklearn/scipy: MCC and F1 are 0 when undefined, Pearson/Spearman are NaN when a
side is constant.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

METRICS = ("accuracy", "f1", "matthews_corrcoef", "pearson_spearman")


def accuracy(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of predictions equal to the label."""
    return float(np.mean(predictions == labels)) if len(labels) else float("nan")


def f1_binary(predictions: np.ndarray, labels: np.ndarray, positive: int = 1) -> float:
    """F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)``; 0 when there is no positive at all."""
    tp = np.sum((predictions == positive) & (labels == positive))
    fp = np.sum((predictions == positive) & (labels != positive))
    fn = np.sum((predictions != positive) & (labels == positive))
    denominator = 2 * tp + fp + fn
    return float(2 * tp / denominator) if denominator else 0.0


def matthews_corrcoef(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation, multi-class form (Gorodkin 2004; sklearn's); 0 when undefined.

    With confusion matrix ``C``, ``t = C.sum(1)`` (true counts), ``p = C.sum(0)`` (predicted counts),
    ``c = trace(C)``, ``s = C.sum()``: ``(c s - t.p) / sqrt((s^2 - p.p)(s^2 - t.t))``; for two classes this
    is ``(TP TN - FP FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))``.
    """
    classes, encoded = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    true_ids, pred_ids = encoded[: len(labels)], encoded[len(labels):]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (true_ids, pred_ids), 1)
    t, p = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    denominator = np.sqrt((s * s - p @ p) * (s * s - t @ t))
    return float((c * s - t @ p) / denominator) if denominator else 0.0


def pearson(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Pearson correlation; NaN if either side is constant."""
    x = predictions.astype(np.float64) - predictions.mean()
    y = labels.astype(np.float64) - labels.mean()
    denominator = np.sqrt((x @ x) * (y @ y))
    return float(x @ y / denominator) if denominator else float("nan")


def spearman(predictions: np.ndarray, labels: np.ndarray) -> float:
    """Spearman correlation: Pearson of the ranks, ties given their average rank (as scipy)."""
    return pearson(rank_average(predictions), rank_average(labels))


def rank_average(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n, tied values sharing the mean of their ranks (``scipy.stats.rankdata``'s default)."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)  # rank of the last member of each group of equal values
    return (last_rank - (counts - 1) / 2.0)[inverse]


def _classes(predictions: np.ndarray) -> np.ndarray:
    """Class ids from ids (N,) or logits (N, C)."""
    return predictions.argmax(axis=-1) if predictions.ndim == 2 else predictions


def _scores(predictions: np.ndarray) -> np.ndarray:
    """Scores from (N,) or (N, 1) regression outputs."""
    return predictions.reshape(len(predictions), -1)[:, 0] if predictions.ndim == 2 else predictions


_METRIC_FNS: dict[str, Callable[[np.ndarray, np.ndarray], dict[str, float]]] = {
    "accuracy": lambda p, y: {"accuracy": accuracy(_classes(p), y)},
    "f1": lambda p, y: {"f1": f1_binary(_classes(p), y), "accuracy": accuracy(_classes(p), y)},
    "matthews_corrcoef": lambda p, y: {"matthews_corrcoef": matthews_corrcoef(_classes(p), y)},
    "pearson_spearman": lambda p, y: {"pearson": pearson(_scores(p), y), "spearman": spearman(_scores(p), y)},
}


def compute_metric(name: str, predictions, labels) -> dict[str, float]:
    """Compute a task's metric(s).

    Parameters
    ----------
    name : str
        One of :data:`METRICS`.
    predictions : array-like
        Class ids ``(N,)``, logits ``(N, C)`` (argmax taken), or scores ``(N,)``/``(N, 1)`` for regression.
        Torch tensors work too (converted with ``np.asarray``; move them to CPU first).
    labels : array-like
        Class ids or float scores, ``(N,)``.

    Returns
    -------
    dict of str to float
        Metric name -> value, e.g. ``{"f1": 0.8, "accuracy": 0.75}``.
    """
    if name not in _METRIC_FNS:
        raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
    predictions, labels = np.asarray(predictions), np.asarray(labels).reshape(-1)
    if len(predictions) != len(labels):
        raise ValueError(f"{name}: {len(predictions)} predictions but {len(labels)} labels")
    return _METRIC_FNS[name](predictions, labels)


def primary_score(result: dict[str, float]) -> float:
    """The task's single number: the mean of its reported metrics (GLUE's convention)."""
    return float(np.mean(list(result.values())))


def score_name(result: dict[str, float]) -> str:
    """What :func:`primary_score` is called: the metric's own name, or ``mean(f1,accuracy)`` when it is a
    mean of several (so a mean is never labelled as one of its parts)."""
    names = list(result)
    return names[0] if len(names) == 1 else f"mean({','.join(names)})"
