"""Aggregation methods, one per file, all behind :class:`~fedlora.aggregators.base.Aggregator`.

Importing this package registers every method; ``get_aggregator(name, **options)`` builds one. Layout:
``base`` (the interface, :class:`Round`, the registry), ``validation`` (input checks, data weights),
``rules`` (pieces of rules several methods share), ``accounting`` (aggregation error and bytes), and one
file per method.
"""

from . import fedex, fedit, ffa, flexlora, flora, fra, hetlora, hexa  # noqa: F401  (registration)
from .accounting import as_lowrank64
from .base import AGGREGATORS, Aggregator, Round, get_aggregator, method_options
from .validation import data_weights, validate_round, validate_update

__all__ = [
    "AGGREGATORS",
    "Aggregator",
    "Round",
    "as_lowrank64",
    "data_weights",
    "get_aggregator",
    "method_options",
    "validate_round",
    "validate_update",
]
