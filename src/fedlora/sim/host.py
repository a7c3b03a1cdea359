"""The host: one base model in memory with a PEFT adapter per client rank, and the frozen weights' version.

Clients are trained one after another on the host by swapping their adapter factors and heads in and out,
so memory grows with adapters, never with copies of the model. Corrections folded for good advance
``version`` (the round whose corrections the frozen weights hold); a client's frozen low-rank terms are
added for its training only and removed bit for bit (:meth:`ModelHost.frozen_terms`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .. import adapters
from ..config import LoraSection
from ..types import LoRAFactors, LowRank, ModuleState


class ModelHost:
    """A PEFT model with an adapter for the global rank and one per other client rank."""

    def __init__(self, model, lora: LoraSection, task_type: str, ranks: Iterable[int]):
        self.model = model
        self.global_rank = lora.rank
        self.layers = adapters.lora_layers(model)
        self._lora, self._task_type = lora, task_type
        self._ranks = {lora.rank}
        for r in sorted(set(ranks)):
            self.adapter_for(r)
        adapters.activate(model, adapters.ADAPTER)
        self.version = 0

    def adapter_for(self, rank: int) -> str:
        """The adapter of LoRA rank ``rank``, added on first use (a client that pruned its rank)."""
        if rank not in self._ranks:
            adapters.add_rank_adapter(self.model, self._lora, self._task_type, rank)
            self._ranks.add(rank)
        return adapters.ADAPTER if rank == self.global_rank else adapters.rank_adapter_name(rank)

    def read_state(self, adapter: str = adapters.ADAPTER) -> dict[str, ModuleState]:
        return adapters.read_state(self.layers, adapter)

    def heads(self, adapter: str = adapters.ADAPTER) -> dict[str, nn.Parameter]:
        return adapters.head_parameters(self.model, adapter)

    def install(self, factors: dict[str, LoRAFactors], head: dict[str, Tensor], adapter: str) -> None:
        """Activate ``adapter`` and load ``factors`` and ``head`` into it."""
        adapters.activate(self.model, adapter)
        adapters.write_factors(self.layers, factors, adapter)
        with torch.no_grad():
            for k, p in self.heads(adapter).items():
                p.copy_(head[k])

    def install_global(self, state: dict[str, ModuleState], head: dict[str, Tensor]) -> None:
        self.install({m: s.factors for m, s in state.items()}, head, adapters.ADAPTER)

    def fold(self, corrections: dict[str, LowRank]) -> None:
        """Fold one round's corrections into the frozen weights for good: the next version."""
        adapters.fold_corrections(self.layers, corrections)
        self.version += 1

    @contextmanager
    def frozen_terms(self, terms: dict[str, LowRank]) -> Iterator[None]:
        """Add low-rank terms to the frozen weights inside the block; restore them bit for bit after."""
        saved = {m: w.clone() for m, w in adapters.base_weights(self.layers, terms).items()}
        adapters.fold_corrections(self.layers, terms)
        try:
            yield
        finally:
            with torch.no_grad():
                for m, w in adapters.base_weights(self.layers, saved).items():
                    w.copy_(saved[m])
