"""Pathological label skew: each client holds exactly ``classes_per_client`` classes.

Li, Diao, Chen and He, "Federated Learning on Non-IID Data Silos: An Experimental Study", 2021
(arXiv:2102.02079), via ``flwr_datasets.partitioner.PathologicalPartitioner``. Each client is given its
classes, then every class's examples are split evenly among the clients holding it.

``class_assignment`` (Flower's ``class_assignment_mode``):

- ``"first-deterministic"`` (default, the paper's): client ``k``'s first class is ``k mod C``, the rest
  drawn at random; with ``K >= C`` every class is used.
- ``"deterministic"``: client ``k`` has classes ``k, k+1, ..., k+c-1 (mod C)``.
- ``"random"``: ``c`` classes drawn at random per client; a class nobody draws is left out (a warning
  names it), so the partition covers a subset of the data.

Example
-------
>>> parts = partition_labels(labels, 10, "pathological", classes_per_client=2, seed=0)
"""

from __future__ import annotations

import warnings
from typing import Literal, get_args

import numpy as np

from .base import Partition, PartitionError, class_ids, flwr_indices, register

ClassAssignment = Literal["first-deterministic", "deterministic", "random"]
CLASS_ASSIGNMENTS = get_args(ClassAssignment)


@register("pathological")
def pathological(labels: np.ndarray, num_clients: int, seed: int = 42, classes_per_client: int = 2,
                 class_assignment: ClassAssignment = "first-deterministic") -> Partition:
    """``classes_per_client`` classes per client, each class shared evenly by its holders.

    Parameters
    ----------
    labels : np.ndarray
        Class id per example.
    num_clients : int
        Number of clients.
    seed : int (default: 42)
        Seed of the class draws and the in-client shuffle.
    classes_per_client : int (default: 2)
        Exact number of distinct classes on each client, ``1..C``.
    class_assignment : str (default: "first-deterministic")
        One of :data:`CLASS_ASSIGNMENTS`.

    Returns
    -------
    list of np.ndarray
        Index arrays; examples of classes no client holds are left out.
    """
    from flwr_datasets.partitioner import PathologicalPartitioner  # flwr_datasets imports `datasets` (~2 s)

    labels = class_ids(labels, "pathological")
    num_classes = len(np.unique(labels))
    if not 1 <= classes_per_client <= num_classes:
        raise PartitionError(f"pathological: classes_per_client must be in 1..{num_classes}, got "
                             f"{classes_per_client}")
    if class_assignment not in CLASS_ASSIGNMENTS:
        raise PartitionError(f"pathological: class_assignment must be one of {CLASS_ASSIGNMENTS}, got "
                             f"{class_assignment!r}")
    partitioner = PathologicalPartitioner(num_partitions=num_clients, partition_by="label",
                                          num_classes_per_partition=classes_per_client,
                                          class_assignment_mode=class_assignment, shuffle=True, seed=seed)
    try:
        parts = flwr_indices(partitioner, labels)
    except ValueError as err:
        raise PartitionError(f"pathological: {err}") from err
    unused = sorted(set(np.unique(labels).tolist()) - set(np.unique(labels[np.concatenate(parts)]).tolist()))
    if unused:
        warnings.warn(f"pathological: no client holds classes {unused}; their examples are left out",
                      stacklevel=3)
    return parts
