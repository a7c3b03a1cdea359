"""Class-imbalanced split (FRA-LoRA's setting): each client is dominated by one class.

Trautmann, Hales and Volk, "Aggregating Low Rank Adapters in Federated Fine-tuning", 2025, compare a
balanced IID split with a "split with imbalanced classes" on SST-2 and MNLI across a few clients; the
paper's text does not give the exact proportions, so this is the project's definition:

- client ``k``'s dominant class is ``k mod C`` (SST-2, 3 clients: negative, positive, negative);
- a fraction ``dominant_fraction`` (default 0.9) of its examples comes from that class, the rest is spread
  evenly over the other ``C - 1`` classes (for two classes: 90% / 10%, alternating across clients);
- all clients get the same size ``n``, the largest for which every class has enough examples
  (``n <= N / K``); examples are drawn without replacement from seeded per-class shuffles.

When classes are not balanced enough for ``n = N / K`` (SST-2 is 44% negative), ``n`` shrinks and some
examples stay unassigned: the partition covers a subset. No Flower partitioner does this
(``DistributionPartitioner`` spreads every sample and needs ``K`` a multiple of ``C``), so it is numpy.

Example
-------
>>> parts = partition_labels(labels, 3, "imbalanced", dominant_fraction=0.9, seed=0)
"""

from __future__ import annotations

import numpy as np

from .base import Partition, PartitionError, class_ids, register


def class_counts(client_size: int, num_clients: int, num_classes: int,
                 dominant_fraction: float) -> np.ndarray:
    """``(K, C)`` counts: ``round(f n)`` of class ``k mod C``, the rest split evenly (first others first)."""
    counts = np.zeros((num_clients, num_classes), dtype=np.int64)
    dominant = int(round(dominant_fraction * client_size)) if num_classes > 1 else client_size
    rest = client_size - dominant
    for k in range(num_clients):
        main = k % num_classes
        others = [(main + j) % num_classes for j in range(1, num_classes)]
        counts[k, main] = dominant
        for j, c in enumerate(others):
            counts[k, c] = rest // len(others) + (j < rest % len(others))
    return counts


@register("imbalanced")
def imbalanced(labels: np.ndarray, num_clients: int, seed: int = 42, dominant_fraction: float = 0.9,
               client_size: int | None = None) -> Partition:
    """Equal-size clients, each with ``dominant_fraction`` of one class.

    Parameters
    ----------
    labels : np.ndarray
        Class id per example (ids ``0..C-1``).
    num_clients : int
        Number of clients.
    seed : int (default: 42)
        Seed of the per-class shuffles.
    dominant_fraction : float (default: 0.9)
        Share of each client's examples from its dominant class, in ``[1/C, 1]``.
    client_size : int or None (default: None)
        Examples per client; ``None`` takes the largest the class counts allow (at most ``N // K``).

    Returns
    -------
    list of np.ndarray
        Index arrays, each of ``client_size`` examples.
    """
    labels = class_ids(labels, "imbalanced")
    num_classes = int(labels.max()) + 1
    if not 1.0 / num_classes <= dominant_fraction <= 1.0:
        raise PartitionError(f"imbalanced: dominant_fraction must be in [1/{num_classes}, 1], got "
                             f"{dominant_fraction}")
    available = np.bincount(labels, minlength=num_classes)

    def fits(n: int) -> bool:
        return bool(np.all(class_counts(n, num_clients, num_classes, dominant_fraction).sum(0) <= available))

    low, high = 0, len(labels) // num_clients  # counts grow with n, so binary search the largest that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    if low < 1 or (client_size is not None and client_size > low):
        raise PartitionError(f"imbalanced: class counts {available.tolist()} allow at most {low} examples "
                             f"per client for {num_clients} clients at dominant_fraction={dominant_fraction}"
                             + (f", asked {client_size}" if client_size is not None else ""))
    size = low if client_size is None else client_size
    counts = class_counts(size, num_clients, num_classes, dominant_fraction)
    rng = np.random.default_rng(seed)
    pools = [rng.permutation(np.flatnonzero(labels == c)) for c in range(num_classes)]
    taken = np.zeros(num_classes, dtype=np.int64)
    parts = []
    for k in range(num_clients):
        chunks = []
        for c in range(num_classes):
            chunks.append(pools[c][taken[c]:taken[c] + counts[k, c]])
            taken[c] += counts[k, c]
        parts.append(np.concatenate(chunks))
    return parts
