"""The aggregator interface, the round it works on, and the registry of methods.

Every method implements one hook, :meth:`Aggregator._combine`: given the :class:`Round` (the global adapter
at the start, each client's trained adapter, the weights ``p_k``) it returns the new global adapter and the
correction to fold into each frozen weight. :meth:`Aggregator.aggregate` does everything common around it:
input checks (:mod:`.validation`), what each client starts from (:meth:`Aggregator.payload`), and the
round's measurements (:mod:`.accounting`): the aggregation error against the ideal
``W + sum_k p_k (client k's full update)``, and bytes on the wire. Shared pieces of the rules themselves
live in :mod:`.rules`. A method registers itself with :func:`register`; :func:`get_aggregator` builds one by
name.
"""

from __future__ import annotations

import inspect
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from torch import Tensor

from .. import lowrank
from ..types import AggregationResult, ClientPayload, ClientUpdate, LoRAFactors, LowRank, ModuleState
from .accounting import aggregation_errors, as_lowrank64, rank_energy, wire_bytes
from .validation import GlobalState, client_rank, data_weights, validate_payloads, validate_round

ERROR_MEASURES = ("exact", "core")

__all__ = [  # as_lowrank64 and data_weights live elsewhere; re-exported for `from .base import ...` callers
    "AGGREGATORS",
    "ERROR_MEASURES",
    "Aggregator",
    "GlobalState",
    "Round",
    "as_lowrank64",
    "data_weights",
    "get_aggregator",
    "method_options",
    "register",
]


# ---------------------------------------------------------------- the round

@dataclass
class Round:
    """Everything a method needs to combine one round; built and checked by :meth:`Aggregator.aggregate`.

    ``trained[k][m]`` is client ``k``'s adapter as it ended the round (a factor the method keeps frozen is
    taken from the client's payload, not from what it sent); ``full(k, m)`` adds the frozen low-rank term the
    client held, so it is client ``k``'s whole update to ``W``.
    """

    global_state: GlobalState
    updates: list[ClientUpdate]
    payloads: list[dict[str, ClientPayload]]
    trained: list[dict[str, LoRAFactors]]
    weights: list[float]
    round_idx: int
    error_measure: str = "exact"
    core_errors: dict[str, float] = field(default_factory=dict)
    """``||ideal - applied||_F`` per module where the method knows it from its small core (``"core"`` only)."""
    move_grams: dict[str, Tensor] = field(default_factory=dict)
    """Cache of :func:`~fedlora.aggregators.accounting.move_gram` per module."""
    move_norms: dict[str, float] = field(default_factory=dict)
    """``||ideal - start||_F`` per module where forming ``M`` gave it (:func:`~.accounting.dense_mean_update`)."""

    @property
    def modules(self) -> list[str]:
        return list(self.global_state)

    def full(self, k: int, module: str) -> LowRank:
        adapter = self.trained[k][module].as_lowrank()
        frozen = self.payloads[k][module].frozen
        return adapter if frozen is None else lowrank.concat([adapter, frozen])

    def inner_rank(self, module: str) -> int:
        """Inner dimension of :meth:`mean_update`: every client's rank plus its frozen term's."""
        return sum(t[module].rank + (0 if p[module].frozen is None else p[module].frozen.rank)
                   for t, p in zip(self.trained, self.payloads))

    def mean_update(self, module: str, weights: Sequence[float] | None = None) -> LowRank:
        """``M = sum_k p_k (s_k B_k A_k + F_k)`` as one stacked product (never dense)."""
        w = self.weights if weights is None else weights
        return lowrank.concat([self.full(k, module) for k in range(len(self.updates))], w)

    def has_frozen_terms(self) -> bool:
        return any(p.frozen is not None for pay in self.payloads for p in pay.values())


# ---------------------------------------------------------------- the interface

class Aggregator(ABC):
    """Base class of all aggregation methods.

    Subclasses set ``name`` and ``exact`` and implement :meth:`_combine`; they may override
    :meth:`trains` (which factors clients train in a round), :meth:`client_weights` and :meth:`payload`.
    ``proximal_mu`` is the weight of the client-side proximal term the method asks for (0: none); the round
    protocol sends it with every client task.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]
    proximal_mu: float = 0.0

    def local_training(self, round_idx: int) -> dict[str, object]:
        """Local-training settings the method asks of every client (fields of
        :class:`fedlora.protocol.TrainSettings`, e.g. HetLoRA's self-pruning); default none."""
        return {}

    def trains(self, round_idx: int) -> tuple[bool, bool]:
        """``(train_A, train_B)`` for clients in round ``round_idx``. A frozen factor is not uploaded."""
        return True, True

    def payload(self, global_state: GlobalState, rank: int, round_idx: int = 0) -> dict[str, ClientPayload]:
        """What a client of LoRA rank ``rank`` starts round ``round_idx`` from.

        Default: the global adapter itself at full rank; at a lower rank its first ``rank`` components,
        with the scale ``alpha / r`` kept in the product (so the client's update is still inexact there).
        """
        return {
            name: ClientPayload(s.factors) if rank == s.factors.rank else self._lower_rank_payload(s.factors, rank)
            for name, s in global_state.items()
        }

    def _lower_rank_payload(self, g: LoRAFactors, rank: int) -> ClientPayload:
        """A client of rank ``rank < r``: the first ``rank`` components, the product's scale kept."""
        client_scale = g.scale * g.rank / rank  # alpha / r_k with alpha = scale * r
        B = g.B[:, :rank] * (g.scale / client_scale)
        return ClientPayload(LoRAFactors(B, g.A[:rank].clone(), client_scale))

    def client_weights(self, rnd: Round) -> list[float]:
        """The round's ``p_k``; default: by data size (or the explicit weights)."""
        return rnd.weights

    @abstractmethod
    def _combine(self, rnd: Round) -> tuple[dict[str, LoRAFactors], dict[str, LowRank]]:
        """New global adapter per module and the correction to each frozen weight (may be empty)."""

    # ------------------------------------------------------------ template
    def aggregate(
        self,
        global_state: GlobalState,
        updates: Sequence[ClientUpdate],
        round_idx: int = 0,
        *,
        payloads: Mapping[str, Mapping[str, ClientPayload]] | None = None,
        next_payloads: bool = True,
        energy_rank: int | None = None,
        error_measure: str = "exact",
    ) -> AggregationResult:
        """One round: validate, combine, measure the error against the ideal, count bytes.

        The result's ``info`` carries ``error_num_sq`` and ``error_den_sq``, the sums over modules of
        ``||ideal - applied||_F^2`` and ``||ideal - start||_F^2`` behind ``error``.

        Parameters
        ----------
        global_state : dict[str, ModuleState]
            The global adapter every client started the round from.
        updates : Sequence[ClientUpdate]
            The clients' trained adapters.
        round_idx : int (default: 0)
            The round, for methods whose rule or payload depends on it.
        payloads : dict[str, dict[str, ClientPayload]] | None (default: None)
            The payload each client (by id) started from, as ``self.payload(global_state, rank, round_idx)``
            gave it; ``None`` recomputes them. Ids not in ``updates`` are ignored; a missing one raises
            :class:`~fedlora.types.AggregationInputError`.
        next_payloads : bool (default: True)
            Compute each client's payload for the next round and its downlink bytes; with ``False``,
            ``client_payloads`` and ``bytes_down`` of the result are ``{}`` (the caller builds and counts the
            messages itself).
        energy_rank : int | None (default: None)
            Also measure the share of the ideal update's energy above this rank (the smallest client rank of
            a heterogeneous federation): ``info["rank_energy"]`` per module, plus ``energy_above_sq`` and
            ``energy_sq`` (see :func:`~fedlora.aggregators.accounting.rank_energy`).
        error_measure : str (default: "exact")
            How the aggregation error is measured. ``"exact"``: in float64 from the stored factors of the ideal
            and of what is applied, rounding of the output factors included. ``"core"``: from the small core
            where the method's algebra gives it (SVD re-factorisation: the tail's singular values and the
            small SVD's residual) and the move Gram in the working precision, at about the cost of the
            truncation alone; other modules are measured as with ``"exact"`` (see ``METHODS.md``).
        """
        if error_measure not in ERROR_MEASURES:
            raise ValueError(f"error_measure must be one of {', '.join(ERROR_MEASURES)}, got {error_measure!r}")
        clock = _PartClock()
        checked = validate_round(global_state, updates)
        train_a, _ = self.trains(round_idx)
        if payloads is None:
            started = [self.payload(global_state, client_rank(u), round_idx) for u in checked]
        else:
            started = validate_payloads(global_state, checked, payloads)
        trained = [
            {
                m: f if train_a else LoRAFactors(f.B, started[k][m].adapter.A, f.scale)
                for m, f in u.factors.items()
            }
            for k, u in enumerate(checked)
        ]
        rnd = Round(global_state, checked, started, trained, data_weights(checked), round_idx, error_measure)
        clock.lap("validate")
        rnd.weights = list(self.client_weights(rnd))
        clock.lap("weights")
        new_factors, corrections = self._combine(rnd)
        new_state = {m: ModuleState(new_factors[m], global_state[m].layout) for m in global_state}
        corrections = {m: c for m, c in corrections.items() if c.rank > 0}
        clock.lap("combine")
        errors, error, sums = aggregation_errors(rnd, new_factors, corrections)
        if energy_rank is not None:
            shares, energy_sums = rank_energy(rnd, energy_rank)
            sums = {**sums, **energy_sums, "rank_energy": shares}
        clock.lap("error")

        following = {
            u.client_id: self.payload(new_state, client_rank(u), round_idx + 1) for u in checked
        } if next_payloads else {}
        clock.lap("payloads")
        itemsize = next(iter(global_state.values())).factors.B.element_size()
        bytes_up, bytes_down = wire_bytes(checked, following, corrections, ship_a=train_a, itemsize=itemsize)
        clock.lap("bytes")
        return AggregationResult(
            global_state=new_state,
            client_payloads=following,
            corrections=corrections,
            weights={u.client_id: w for u, w in zip(checked, rnd.weights)},
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            errors=errors,
            error=error,
            info=sums,
            seconds=clock.seconds,
        )


class _PartClock:
    """Seconds spent in each named part of a call, lap by lap."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, part: str) -> None:
        now = time.perf_counter()
        self.seconds[part] = self.seconds.get(part, 0.0) + now - self._last
        self._last = now


# ---------------------------------------------------------------- registry

AGGREGATORS: dict[str, type[Aggregator]] = {}


def register(cls: type[Aggregator]) -> type[Aggregator]:
    """Class decorator: make a method available by its ``name``."""
    if cls.name in AGGREGATORS:
        raise ValueError(f"aggregator {cls.name!r} registered twice")
    AGGREGATORS[cls.name] = cls
    return cls


def get_aggregator(name: str, **kwargs) -> Aggregator:
    """Instantiate a registered method by name, e.g. ``get_aggregator("fra", fold_tail=True)``."""
    try:
        cls = AGGREGATORS[name]
    except KeyError:
        raise ValueError(f"unknown aggregation method {name!r}; known: {', '.join(sorted(AGGREGATORS))}") from None
    valid = method_options(name)
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        listed = ", ".join(valid) if valid else "none"
        raise ValueError(f"{name}: unknown option {unknown[0]!r}; valid options: {listed}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a value of the wrong type, caught by the method's own checks
        raise ValueError(f"{name}: bad option value ({str(err).splitlines()[0]}) in {kwargs}") from None


def method_options(name: str) -> dict[str, object]:
    """The keyword options of method ``name`` and their defaults, read from its constructor's signature."""
    params = inspect.signature(AGGREGATORS[name].__init__).parameters.values()
    return {
        p.name: p.default for p in params
        if p.name != "self" and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)
    }
