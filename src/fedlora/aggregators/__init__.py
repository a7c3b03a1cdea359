"""Aggregation methods, one per file, all behind :class:`~fedlora.aggregators.base.Aggregator`.

Importing this package registers every method; ``get_aggregator(name, **options)`` builds one.
"""

from . import fedex, fedit, ffa, flexlora, flora, fra, hetlora, hexa  # noqa: F401  (registration)
from .base import AGGREGATORS, Aggregator, Round, get_aggregator, validate_round, validate_update

__all__ = ["AGGREGATORS", "Aggregator", "Round", "get_aggregator", "validate_round", "validate_update"]
