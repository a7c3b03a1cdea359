"""fedlora: federated fine-tuning of language models with LoRA adapters."""

from .aggregators import AGGREGATORS, Aggregator, get_aggregator
from .types import (
    AggregationInputError,
    AggregationResult,
    ClientPayload,
    ClientUpdate,
    LoRAFactors,
    LowRank,
    ModuleState,
)

__all__ = [
    "AGGREGATORS",
    "AggregationInputError",
    "AggregationResult",
    "Aggregator",
    "ClientPayload",
    "ClientUpdate",
    "LoRAFactors",
    "LowRank",
    "ModuleState",
    "get_aggregator",
]
__version__ = "0.1.0"
