"""The aggregator interface, its registry, input checks and the round's bookkeeping.

Every method implements one hook, :meth:`Aggregator._combine`: given the round (the global adapter at the
start, each client's trained adapter, the weights ``p_k``) it returns the new global adapter and the
correction to fold into each frozen weight. The base class does everything common: validation, weights,
what each client starts from (:meth:`Aggregator.payload`), the aggregation error against the ideal
``W + sum_k p_k (client k's full update)``, and bytes on the wire.
"""

from __future__ import annotations

import inspect
import math
import numbers
import zlib
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
from torch import Tensor

from .. import lowrank
from ..types import (
    AggregationInputError,
    AggregationResult,
    ClientPayload,
    ClientUpdate,
    LoRAFactors,
    LowRank,
    ModuleState,
)

GlobalState = dict[str, ModuleState]


# ---------------------------------------------------------------- input checks

def _check_finite(t: Tensor, what: str, client_id: str, module: str) -> None:
    if not torch.isfinite(t).all():
        raise AggregationInputError(f"{what} contains NaN or Inf", client_id=client_id, module=module)


def validate_update(global_state: GlobalState, update: ClientUpdate) -> ClientUpdate:
    """Check one client update against the global state; return it cast to the global dtype and device.

    Raises :class:`AggregationInputError` (a ``ValueError``) naming the client and module.
    """
    cid = update.client_id
    field_name, value = ("weight", update.weight) if update.weight is not None else ("num_examples", update.num_examples)
    if not _is_real(value) or not math.isfinite(value) or value < 0:
        raise AggregationInputError(f"{field_name} must be a finite number >= 0, got {value!r}", client_id=cid)
    missing = sorted(set(global_state) - set(update.factors))
    extra = sorted(set(update.factors) - set(global_state))
    if missing or extra:
        module = (missing or extra)[0]
        raise AggregationInputError(
            f"modules do not match the global adapter (missing {missing}, unexpected {extra})",
            client_id=cid, module=module,
        )
    cast: dict[str, LoRAFactors] = {}
    for name, state in global_state.items():
        f = update.factors[name]
        ref = state.factors
        d_out, d_in = ref.shape
        if not isinstance(f, LoRAFactors):
            raise AggregationInputError(f"expected LoRAFactors, got {type(f).__name__}", client_id=cid, module=name)
        for side, t in (("B", f.B), ("A", f.A)):
            if not isinstance(t, Tensor):
                kind = f"{type(t).__module__}.{type(t).__name__}".removeprefix("builtins.")
                hint = " (convert with torch.from_numpy)" if kind.startswith("numpy.") else ""
                raise AggregationInputError(
                    f"factor {side} is a {kind}, expected a torch.Tensor{hint}", client_id=cid, module=name
                )
        if f.B.ndim != 2 or f.A.ndim != 2:
            raise AggregationInputError("factors must be 2-D", client_id=cid, module=name)
        if f.B.shape[0] != d_out or f.A.shape[1] != d_in or f.B.shape[1] != f.A.shape[0]:
            raise AggregationInputError(
                f"shape mismatch: B {tuple(f.B.shape)}, A {tuple(f.A.shape)}; expected B ({d_out}, r), "
                f"A (r, {d_in})", client_id=cid, module=name,
            )
        if update.rank is not None and f.rank != update.rank:
            raise AggregationInputError(
                f"rank {f.rank} differs from the declared rank {update.rank}", client_id=cid, module=name
            )
        if f.rank > ref.rank:
            raise AggregationInputError(
                f"rank {f.rank} exceeds the global rank {ref.rank}", client_id=cid, module=name
            )
        if not (math.isfinite(f.scale) and f.scale > 0):
            raise AggregationInputError(f"scale must be finite and > 0, got {f.scale}", client_id=cid, module=name)
        _check_finite(f.B, "B", cid, name)
        _check_finite(f.A, "A", cid, name)
        kw = {"dtype": ref.B.dtype, "device": ref.B.device}
        cast[name] = LoRAFactors(f.B.to(**kw), f.A.to(**kw), float(f.scale))
    ranks = {f.rank for f in cast.values()}
    if len(ranks) > 1:
        raise AggregationInputError(f"modules have different ranks {sorted(ranks)}", client_id=cid)
    return replace(update, factors=cast)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) or (
        isinstance(value, Tensor) and value.numel() == 1 and not value.dtype.is_complex
    )


def validate_round(global_state: GlobalState, updates: Sequence[ClientUpdate]) -> list[ClientUpdate]:
    if not global_state:
        raise AggregationInputError("the global adapter has no modules")
    if not updates:
        raise AggregationInputError("empty round: no client updates to aggregate")
    seen: set[str] = set()
    for u in updates:
        if u.client_id in seen:
            raise AggregationInputError("appears twice in one round", client_id=u.client_id)
        seen.add(u.client_id)
    checked = [validate_update(global_state, u) for u in updates]
    if sum(_raw_weight(u) for u in checked) <= 0:
        ids = ", ".join(repr(u.client_id) for u in checked)
        raise AggregationInputError(f"all client weights are zero (clients {ids})")
    return checked


def _raw_weight(update: ClientUpdate) -> float:
    return float(update.weight) if update.weight is not None else float(update.num_examples)


def data_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """``p_k = w_k / sum w``, with ``w_k`` the explicit weight or else the number of examples."""
    raw = [_raw_weight(u) for u in updates]
    total = sum(raw)
    return [w / total for w in raw]


def client_rank(update: ClientUpdate) -> int:
    return next(iter(update.factors.values())).rank


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

    @property
    def modules(self) -> list[str]:
        return list(self.global_state)

    def full(self, k: int, module: str) -> LowRank:
        adapter = self.trained[k][module].as_lowrank()
        frozen = self.payloads[k][module].frozen
        return adapter if frozen is None else lowrank.concat([adapter, frozen])

    def mean_update(self, module: str, weights: Sequence[float] | None = None) -> LowRank:
        """``M = sum_k p_k (s_k B_k A_k + F_k)`` as one stacked product (never dense)."""
        w = self.weights if weights is None else weights
        return lowrank.concat([self.full(k, module) for k in range(len(self.updates))], w)

    def has_frozen_terms(self) -> bool:
        return any(p.frozen is not None for pay in self.payloads for p in pay.values())


def global_rank(state: ModuleState) -> int:
    return state.factors.rank


# ---------------------------------------------------------------- the interface

class Aggregator(ABC):
    """Base class of all aggregation methods.

    Subclasses set ``name`` and ``exact`` and implement :meth:`_combine`; they may override
    :meth:`trains` (which factors clients train in a round), :meth:`client_weights` and :meth:`payload`.
    """

    name: ClassVar[str]
    exact: ClassVar[bool]

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
        self, global_state: GlobalState, updates: Sequence[ClientUpdate], round_idx: int = 0
    ) -> AggregationResult:
        """One round: validate, combine, measure the error against the ideal, count bytes."""
        checked = validate_round(global_state, updates)
        train_a, _ = self.trains(round_idx)
        payloads = [self.payload(global_state, client_rank(u), round_idx) for u in checked]
        trained = [
            {
                m: f if train_a else LoRAFactors(f.B, payloads[k][m].adapter.A, f.scale)
                for m, f in u.factors.items()
            }
            for k, u in enumerate(checked)
        ]
        rnd = Round(global_state, checked, payloads, trained, data_weights(checked), round_idx)
        rnd.weights = list(self.client_weights(rnd))
        new_factors, corrections = self._combine(rnd)
        new_state = {m: ModuleState(new_factors[m], global_state[m].layout) for m in global_state}
        corrections = {m: c for m, c in corrections.items() if c.rank > 0}

        # The error is measured in float64 from the stored factors: in float32 the cancellation in
        # ``ideal - applied`` would otherwise leave rounding noise (~1e-5 relative) in an exact method's
        # error.
        errors, num_sq, den_sq = {}, 0.0, 0.0
        for m, state in global_state.items():
            ideal = lowrank.concat([as_lowrank64(rnd.trained[k][m], rnd.payloads[k][m].frozen)
                                    for k in range(len(checked))], rnd.weights)
            applied = [as_lowrank64(new_factors[m])]
            if m in corrections:
                applied.append(as_lowrank64(None, corrections[m]))
            num = lowrank.frobenius_norm(lowrank.concat([ideal, *applied], [1.0] + [-1.0] * len(applied)))
            den = lowrank.frobenius_norm(lowrank.subtract(ideal, as_lowrank64(state.factors)))
            errors[m] = _ratio(num, den)
            num_sq += num * num
            den_sq += den * den

        ids = [u.client_id for u in checked]
        next_payloads = {cid: self.payload(new_state, client_rank(u), round_idx + 1) for cid, u in zip(ids, checked)}
        itemsize = next(iter(global_state.values())).factors.B.element_size()
        correction_numel = sum(lowrank.wire_numel(c) for c in corrections.values())
        bytes_up = {
            cid: itemsize * sum(f.B.numel() + (f.A.numel() if train_a else 0) for f in u.factors.values())
            for cid, u in zip(ids, checked)
        }
        bytes_down = {
            cid: itemsize * (correction_numel + sum(_payload_numel(p, ship_a=train_a) for p in pay.values()))
            for cid, pay in next_payloads.items()
        }
        return AggregationResult(
            global_state=new_state,
            client_payloads=next_payloads,
            corrections=corrections,
            weights=dict(zip(ids, rnd.weights)),
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            errors=errors,
            error=_ratio(math.sqrt(num_sq), math.sqrt(den_sq)),
        )


def as_lowrank64(adapter: LoRAFactors | None, extra: LowRank | None = None) -> LowRank:
    """``scale * B @ A`` (plus ``extra``) as a float64 product, the scale applied in float64."""
    terms = []
    if adapter is not None:
        terms.append(LowRank(adapter.B.double() * adapter.scale, adapter.A.double()))
    if extra is not None:
        terms.append(LowRank(extra.left.double(), extra.right.double()))
    return terms[0] if len(terms) == 1 else lowrank.concat(terms)


def _ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return num / den


def _payload_numel(p: ClientPayload, *, ship_a: bool) -> int:
    # A factor that did not train this round (FFA's seeded A) is already on the client.
    n = p.adapter.B.numel() + (p.adapter.A.numel() if ship_a else 0)
    return n + (lowrank.wire_numel(p.frozen) if p.frozen is not None else 0)


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


# ---------------------------------------------------------------- shared pieces of the rules

def padded_mean(rnd: Round, module: str, weights: Sequence[float] | None = None) -> LoRAFactors:
    """``B = sum_k p_k (s_k / s) pad(B_k)``, ``A = sum_k p_k pad(A_k)`` at the global rank and scale.

    Zero-padding leaves each product unchanged and ``s_k / s`` keeps ``s B_k A_k = s_k B_k A_k`` when
    clients use other ranks (``s = alpha / r``).
    """
    g = rnd.global_state[module].factors
    w = rnd.weights if weights is None else weights
    B = torch.zeros_like(g.B)
    A = torch.zeros_like(g.A)
    for p, client in zip(w, rnd.trained):
        f = lowrank.pad_rank(client[module], g.rank)
        B += (p * f.scale / g.scale) * f.B
        A += p * f.A
    return LoRAFactors(B, A, g.scale)


def frozen_a_mean(rnd: Round, module: str) -> LoRAFactors:
    """FFA's rule: ``B = sum_k p_k (s_k / s) pad(B_k)`` and ``A`` the global (frozen) ``A``.

    Clients of rank ``r_k`` train against the first ``r_k`` rows of the global ``A``, so
    ``s B A = sum_k p_k s_k B_k A[:r_k]`` exactly. Averaging the zero-padded ``A`` rows instead (as
    :func:`padded_mean` does) would shrink the rows only large-rank clients hold and break exactness
    whenever ranks differ.
    """
    mean = padded_mean(rnd, module)
    return LoRAFactors(mean.B, rnd.global_state[module].factors.A.clone(), mean.scale)


def exact_residual(rnd: Round, module: str, mean: LoRAFactors) -> LowRank:
    """``R = sum_k p_k s_k B_k A_k - s B A`` for ``B, A`` from :func:`padded_mean`, kept as factors.

    With ``Bt_k = (s_k / s) pad(B_k)`` and ``sum_k p_k (Bt_k - B) = 0``,
    ``R = s sum_{k<K} p_k (Bt_k - B)(A_k - A_K)``: inner dimension ``(K - 1) r``, the bound on its rank.
    Clients holding frozen terms (HEXA's heterogeneous ranks) fall back to ``M - s B A``, re-compressed.
    """
    if rnd.has_frozen_terms():
        return lowrank.compact(lowrank.subtract(rnd.mean_update(module), mean.as_lowrank()))
    g = rnd.global_state[module].factors
    padded = [lowrank.pad_rank(c[module], g.rank) for c in rnd.trained]
    last = padded[-1]
    terms = [
        LowRank((p * mean.scale) * (f.B * (f.scale / mean.scale) - mean.B), f.A - last.A)
        for p, f in zip(rnd.weights[:-1], padded[:-1])
    ]
    if not terms:  # one client: the mean is the client, nothing is left over
        return LowRank.zeros(*g.shape, dtype=g.B.dtype, device=g.B.device)
    return lowrank.concat(terms)


def revive_dead_ranks(factors: LoRAFactors, seed: int) -> LoRAFactors:
    """Give rank slots where both ``B``'s column and ``A``'s row are zero a fresh PEFT-style ``A`` row.

    Such a slot would get zero gradient in both factors forever; with ``B = 0`` the product is unchanged.
    """
    dead = (factors.B.abs().sum(0) == 0) & (factors.A.abs().sum(1) == 0)
    if not bool(dead.any()):
        return factors
    gen = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(factors.A.shape[1])  # kaiming_uniform(a=sqrt(5)), as PEFT initialises A
    fresh = (torch.rand(int(dead.sum()), factors.A.shape[1], generator=gen, dtype=torch.float64) * 2 - 1) * bound
    A = factors.A.clone()
    A[dead] = fresh.to(A.dtype).to(A.device)
    return LoRAFactors(factors.B, A, factors.scale)


def refactorized(rnd: Round, module: str, split: str = "balanced") -> tuple[LoRAFactors, LowRank]:
    """Top-``r`` SVD of ``M = sum_k p_k (client k's update)`` as the new adapter, and the exact tail."""
    g = rnd.global_state[module].factors
    head, tail, _ = lowrank.truncate(rnd.mean_update(module), g.rank, split)
    factors = lowrank.factors_from_product(head, g.scale, split)
    return revive_dead_ranks(factors, seed=zlib.crc32(f"{rnd.round_idx}:{module}".encode())), tail
