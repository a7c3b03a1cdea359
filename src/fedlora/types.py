"""Plain data types that cross the aggregation boundary.

Nothing here imports the rest of fedlora, models, data or engines. Orientation is always PEFT's
``nn.Linear`` one: ``B`` is ``(d_out, r)``, ``A`` is ``(r, d_in)`` and a module's weight update is
``scale * B @ A`` of shape ``(d_out, d_in)``. ``layout`` only says how the frozen weight is *stored*
(``conv1d``: GPT-2's ``Conv1D`` keeps ``W`` as ``(d_in, d_out)``), which matters when a dense
correction is folded into it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

Layout = Literal["linear", "conv1d"]
LAYOUTS: tuple[str, ...] = ("linear", "conv1d")


class AggregationInputError(ValueError):
    """Bad input to an aggregator; the message names the client and module when they are known."""

    def __init__(self, message: str, *, client_id: str | None = None, module: str | None = None):
        where = ", ".join(
            part for part in (f"client {client_id!r}" if client_id is not None else "",
                              f"module {module!r}" if module is not None else "") if part
        )
        super().__init__(f"{where}: {message}" if where else message)
        self.client_id = client_id
        self.module = module


@dataclass(frozen=True)
class LowRank:
    """A matrix kept as a product ``left @ right``: ``left`` is ``(m, k)``, ``right`` is ``(k, n)``."""

    left: Tensor
    right: Tensor

    def __post_init__(self) -> None:
        if self.left.ndim != 2 or self.right.ndim != 2 or self.left.shape[1] != self.right.shape[0]:
            raise ValueError(
                f"LowRank factors do not chain: left {tuple(self.left.shape)}, right {tuple(self.right.shape)}"
            )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.left.shape[0], self.right.shape[1])

    @property
    def rank(self) -> int:
        """Inner dimension (an upper bound on the true rank)."""
        return self.left.shape[1]

    def numel(self) -> int:
        return self.left.numel() + self.right.numel()

    def dense(self) -> Tensor:
        return self.left @ self.right

    @staticmethod
    def zeros(m: int, n: int, *, dtype: torch.dtype = torch.float32, device=None) -> LowRank:
        return LowRank(torch.zeros(m, 0, dtype=dtype, device=device), torch.zeros(0, n, dtype=dtype, device=device))


@dataclass(frozen=True)
class LoRAFactors:
    """One module's LoRA adapter: update ``scale * B @ A``."""

    B: Tensor  # (d_out, r)
    A: Tensor  # (r, d_in)
    scale: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.B.shape[0], self.A.shape[1])

    def as_lowrank(self) -> LowRank:
        """The update as a product, scale folded into the left factor."""
        return LowRank(self.B * self.scale, self.A)

    def delta(self) -> Tensor:
        """Dense ``scale * B @ A``; only for small modules and tests."""
        return self.scale * (self.B @ self.A)


@dataclass(frozen=True)
class ModuleState:
    """The global adapter of one module, and how its frozen weight is stored."""

    factors: LoRAFactors
    layout: Layout = "linear"

    @property
    def rank(self) -> int:
        return self.factors.rank


@dataclass
class ClientUpdate:
    """What one client returns after local training.

    ``factors`` maps module name to the client's trained adapter. Its ``rank`` is the rank the client
    declared (checked against every module's factors). The aggregation weight is ``weight`` when given,
    else ``num_examples``; both are normalised over the round. ``label_histogram`` is optional and used
    only by methods that weigh clients by label divergence.
    """

    client_id: str
    factors: dict[str, LoRAFactors]
    num_examples: int
    rank: int | None = None
    weight: float | None = None
    label_histogram: Tensor | None = None


@dataclass(frozen=True)
class ClientPayload:
    """What the server sends a client for one module: a trainable adapter, plus an optional frozen
    low-rank term (already scaled, linear orientation) the client adds to its model without training."""

    adapter: LoRAFactors
    frozen: LowRank | None = None


@dataclass
class AggregationResult:
    """Outcome of one aggregation round.

    ``corrections`` are updates to each frozen weight, linear orientation, scale included; fold them with
    :func:`fedlora.lowrank.fold_into_weight` which handles the storage layout. ``errors`` are per module
    ``||ideal - applied||_F / ||ideal - start||_F``; ``error`` is the same ratio over all modules.
    """

    global_state: dict[str, ModuleState]
    client_payloads: dict[str, dict[str, ClientPayload]]
    corrections: dict[str, LowRank]
    weights: dict[str, float]
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    errors: dict[str, float]
    error: float
    info: dict[str, object] = field(default_factory=dict)  # measurement sums; per-module dicts
    seconds: dict[str, float] = field(default_factory=dict)
    """Wall time of each part of :meth:`~fedlora.aggregators.Aggregator.aggregate`: ``validate``, ``weights``,
    ``combine`` (the method's rule: SVD, corrections), ``error``, ``payloads`` and ``bytes``."""
