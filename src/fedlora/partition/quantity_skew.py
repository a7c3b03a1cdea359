"""Quantity skew: client sizes differ, labels stay IID (each client is a uniform random sample).

Sizes follow either ``Dir(beta)`` proportions over clients (Li et al., "Federated Learning on Non-IID
Data Silos", 2021, arXiv:2102.02079: smaller ``beta``, more unequal) or, when ``exponent`` is given, a
power law: client ``k`` gets a share proportional to ``(k + 1) ** -exponent`` (so client 0 is largest).
Every client first gets ``min_partition_size`` examples; the rest is split by the proportions with
largest-remainder rounding, so sizes sum to ``N`` exactly. A seeded shuffle is cut into blocks of those
sizes by ``flwr_datasets.partitioner.SizePartitioner``.

Example
-------
>>> [len(p) for p in partition_labels(np.zeros(100), 4, "quantity_skew", exponent=1.0)]
[47, 24, 16, 13]
"""

from __future__ import annotations

import numpy as np

from .base import Partition, PartitionError, flwr_indices, register


def client_sizes(num_examples: int, proportions: np.ndarray, min_partition_size: int = 1) -> np.ndarray:
    """Integer sizes ``>= min_partition_size`` summing to ``num_examples``, otherwise ~ ``proportions``."""
    num_clients = len(proportions)
    spare = num_examples - min_partition_size * num_clients
    if min_partition_size < 1 or spare < 0:
        raise PartitionError(f"quantity_skew: need 1 <= min_partition_size <= {num_examples // num_clients}, "
                             f"got {min_partition_size}")
    share = spare * proportions / proportions.sum()
    extra = np.floor(share).astype(np.int64)
    leftover = spare - extra.sum()
    extra[np.argsort(-(share - extra), kind="stable")[:leftover]] += 1  # largest remainders first
    return extra + min_partition_size


@register("quantity_skew")
def quantity_skew(labels: np.ndarray, num_clients: int, seed: int = 42, beta: float = 0.3,
                  exponent: float | None = None, min_partition_size: int = 1) -> Partition:
    """Unequal client sizes, IID labels.

    Parameters
    ----------
    labels : np.ndarray
        One entry per example (only the length is used).
    num_clients : int
        Number of clients.
    seed : int (default: 42)
        Seed of the size draw and the shuffle.
    beta : float (default: 0.3)
        Dirichlet concentration of the size proportions (ignored when ``exponent`` is set).
    exponent : float or None (default: None)
        Power-law exponent; ``None`` uses the Dirichlet sizes.
    min_partition_size : int (default: 1)
        Smallest client size.

    Returns
    -------
    list of np.ndarray
        Index arrays covering every example.
    """
    from flwr_datasets.partitioner import SizePartitioner  # flwr_datasets imports `datasets` (~2 s)

    rng = np.random.default_rng(seed)
    if exponent is not None:
        proportions = (np.arange(num_clients) + 1.0) ** -float(exponent)
    elif beta > 0:
        proportions = rng.dirichlet(np.full(num_clients, float(beta)))
    else:
        raise PartitionError(f"quantity_skew: beta must be > 0, got {beta}")
    sizes = client_sizes(len(labels), proportions, min_partition_size)
    order = rng.permutation(len(labels))
    # SizePartitioner accepts only Python ints (isinstance(size, int)), not numpy integers.
    return flwr_indices(SizePartitioner([int(s) for s in sizes]), labels, order)
