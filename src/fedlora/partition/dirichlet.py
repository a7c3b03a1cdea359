"""Dirichlet label skew: for each class, its examples are split across clients by ``Dir(alpha)``.

Hsu, Qi and Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
Classification", 2019 (arXiv:1909.06335); the algorithm of Yurochkin et al. 2019 (arXiv:1905.12022) as
``flwr_datasets.partitioner.DirichletPartitioner`` implements it. Small ``alpha`` (0.1) gives each client a
few dominant classes; large ``alpha`` (100) approaches IID. Every example is assigned. The default
``alpha=0.3`` is the project's default experiment.

``min_partition_size`` (default 1: every client gets an example) is met by redrawing all proportions;
Flower gives up after 10 redraws, and the next seeds of a fixed sequence follow (:data:`SEED_ATTEMPTS`), so a
seed whose first draws succeed keeps its partition; after all of them we raise :class:`PartitionError`
(raise ``alpha``, lower ``num_clients`` or ``min_partition_size``). ``self_balancing`` (off by default, as in
Flower) stops giving a client more once it holds more than ``N / K`` examples.

Example
-------
>>> parts = partition_labels(labels, num_clients=10, scheme="dirichlet", alpha=0.5, seed=0)
"""

from __future__ import annotations

import numpy as np

from .base import Partition, PartitionError, class_ids, flwr_indices, register


@register("dirichlet")
def dirichlet(labels: np.ndarray, num_clients: int, seed: int = 42, alpha: float = 0.3,
              min_partition_size: int = 1, self_balancing: bool = False) -> Partition:
    """Per-class ``Dir(alpha)`` proportions over clients.

    Parameters
    ----------
    labels : np.ndarray
        Class id per example.
    num_clients : int
        Number of clients.
    seed : int (default: 42)
        Seed of the Dirichlet draws and the in-client shuffle.
    alpha : float (default: 0.3)
        Concentration, ``> 0``; smaller is more skewed.
    min_partition_size : int (default: 1)
        Smallest client size accepted before redrawing (10 redraws for each of :data:`SEED_ATTEMPTS` seeds).
    self_balancing : bool (default: False)
        Skip clients already above the average size when placing a class.

    Returns
    -------
    list of np.ndarray
        Index arrays covering every example.
    """
    from flwr_datasets.partitioner import DirichletPartitioner  # flwr_datasets imports `datasets` (~2 s)

    labels = class_ids(labels, "dirichlet")
    if alpha <= 0:
        raise PartitionError(f"dirichlet: alpha must be > 0, got {alpha}")
    if min_partition_size < 1 or min_partition_size * num_clients > len(labels):
        raise PartitionError(f"dirichlet: min_partition_size={min_partition_size} must be >= 1 and at most "
                             f"{len(labels) // num_clients} ({len(labels)} examples / {num_clients} clients)")
    # Flower redraws 10 times from one seed; a skewed draw (alpha 0.1, few classes) can miss the minimum size
    # in all ten, so seeds derived from it follow in a fixed order. A seed that succeeds at once keeps its draw.
    for attempt in range(SEED_ATTEMPTS):
        partitioner = DirichletPartitioner(num_partitions=num_clients, partition_by="label", alpha=float(alpha),
                                           min_partition_size=min_partition_size, self_balancing=self_balancing,
                                           shuffle=True, seed=_attempt_seed(seed, attempt))
        try:
            return flwr_indices(partitioner, labels)
        except ValueError as err:
            last = err
    raise PartitionError(f"dirichlet: no draw with alpha={alpha} gave all {num_clients} clients >= "
                         f"{min_partition_size} examples in {SEED_ATTEMPTS} seeds x 10 redraws; raise alpha or "
                         f"lower num_clients or min_partition_size ({last})")


SEED_ATTEMPTS = 10
"""Seeds tried in turn (each with Flower's 10 redraws) before a minimum client size is declared unreachable."""


def _attempt_seed(seed: int, attempt: int) -> int:
    """``seed`` itself first, then well-mixed seeds derived from ``(seed, attempt)`` (not ``seed + i``: runs of
    nearby seeds are the same draws one step later)."""
    return seed if attempt == 0 else int(np.random.SeedSequence([seed, attempt]).generate_state(1)[0])
