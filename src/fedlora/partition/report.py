"""Per-client label histograms: count them, measure their skew, save them as JSON and a stacked-bar PNG.

Drawing uses ``matplotlib.figure.Figure`` with the Agg canvas directly: no pyplot state, no display needed.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def label_histograms(labels, partitions: Sequence[np.ndarray], num_labels: int) -> np.ndarray:
    """Count each class on each client.

    Parameters
    ----------
    labels : array-like
        Class id per example, ``(N,)``.
    partitions : sequence of np.ndarray
        Example indices per client.
    num_labels : int
        Number of classes ``C``.

    Returns
    -------
    np.ndarray
        ``int64`` counts of shape ``(K, C)``: row ``k`` is client ``k``'s histogram.
    """
    labels = np.asarray(labels).astype(np.int64)
    return np.stack([np.bincount(labels[np.asarray(p, dtype=np.int64)], minlength=num_labels)[:num_labels]
                     for p in partitions])


def kl_to_global(hist: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    """``KL(client || all clients pooled)`` per client, in nats: 0 for IID, larger for more label skew."""
    hist = np.asarray(hist, dtype=np.float64)
    pooled = hist.sum(axis=0) / hist.sum()
    local = hist / np.maximum(hist.sum(axis=1, keepdims=True), eps)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(local > 0, local * np.log(local / np.maximum(pooled, eps)), 0.0)
    return terms.sum(axis=1)


def save_histograms(hist: np.ndarray, path_json: str | Path, path_png: str | Path,
                    label_names: Sequence[str] | None = None, title: str | None = None) -> None:
    """Write the histograms as JSON and draw them as a stacked bar chart (one bar per client).

    Parameters
    ----------
    hist : np.ndarray
        ``(K, C)`` counts from :func:`label_histograms`.
    path_json : str or Path
        JSON output: ``label_names``, ``counts`` (K x C), ``sizes`` and ``kl_to_global`` per client.
    path_png : str or Path
        PNG output. Parent folders are created for both.
    label_names : sequence of str or None (default: None)
        Legend entries; ``None`` uses ``"0"``, ``"1"``, ...
    title : str or None (default: None)
        Chart title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = np.asarray(hist, dtype=np.int64)
    num_clients, num_labels = hist.shape
    names = list(label_names) if label_names is not None else [str(c) for c in range(num_labels)]
    record = {"label_names": names, "counts": hist.tolist(), "sizes": hist.sum(axis=1).tolist(),
              "kl_to_global": [round(float(v), 6) for v in kl_to_global(hist)]}
    for path in (Path(path_json), Path(path_png)):
        path.parent.mkdir(parents=True, exist_ok=True)
    Path(path_json).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")

    figure = Figure(figsize=(max(4.0, 0.35 * num_clients + 2.5), 3.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    clients, bottom = np.arange(num_clients), np.zeros(num_clients)
    for c in range(num_labels):
        axes.bar(clients, hist[:, c], bottom=bottom, label=names[c], width=0.8)
        bottom += hist[:, c]
    axes.set_xlabel("client")
    axes.set_ylabel("examples")
    axes.set_xticks(clients if num_clients <= 30 else clients[:: max(1, num_clients // 15)])
    if title:
        axes.set_title(title)
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    figure.savefig(path_png, dpi=100)
