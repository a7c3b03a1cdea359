"""Split a dataset's examples among federated clients, one scheme per file, all seeded.

``partition_labels(labels, num_clients, scheme, seed, **options)`` returns each client's example indices.
Schemes (the registry :data:`PARTITIONERS`): ``iid``, ``dirichlet`` (``alpha``), ``pathological``
(``classes_per_client``), ``quantity_skew`` (``beta`` / ``exponent``), ``imbalanced`` (``dominant_fraction``,
FRA-LoRA's class-imbalanced split). A scheme's options are its keyword parameters: ``partition_options(name)``
gives them with their defaults, ``partition_option_types(name)`` their annotations.
``client_test_split`` holds out a local test set; ``label_histograms`` / ``save_histograms`` report them.

Example
-------
>>> parts = partition_labels(train.labels, 10, "dirichlet", seed=0, alpha=0.3)
>>> client_data = [train.subset(p) for p in parts]
"""

from . import dirichlet, iid, imbalanced, pathological, quantity_skew  # noqa: F401  (registration)
from .base import (
    PARTITIONERS,
    PartitionError,
    client_test_split,
    partition_labels,
    partition_option_types,
    partition_options,
    register,
)
from .report import kl_to_global, label_histograms, save_histograms

__all__ = [
    "PARTITIONERS",
    "PartitionError",
    "client_test_split",
    "kl_to_global",
    "label_histograms",
    "partition_labels",
    "partition_option_types",
    "partition_options",
    "register",
    "save_histograms",
]
