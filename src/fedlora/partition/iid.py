"""IID: a seeded shuffle cut into ``K`` near-equal contiguous blocks (sizes differ by at most one).

Uses ``flwr_datasets.partitioner.IidPartitioner``, which shards contiguously and has no seed; the
shuffle is ours. Labels are ignored.

Example
-------
>>> [len(p) for p in partition_labels(np.zeros(10), 3, "iid", seed=0)]
[4, 3, 3]
"""

from __future__ import annotations

import numpy as np

from .base import Partition, flwr_indices, register


@register("iid")
def iid(labels: np.ndarray, num_clients: int, seed: int = 42) -> Partition:
    """Uniformly random equal-size split.

    Parameters
    ----------
    labels : np.ndarray
        One entry per example (only the length is used).
    num_clients : int
        Number of clients.
    seed : int (default: 42)
        Seed of the shuffle.

    Returns
    -------
    list of np.ndarray
        Index arrays covering every example.
    """
    from flwr_datasets.partitioner import IidPartitioner  # flwr_datasets imports `datasets` (~2 s)

    order = np.random.default_rng(seed).permutation(len(labels))
    return flwr_indices(IidPartitioner(num_partitions=num_clients), labels, order)
