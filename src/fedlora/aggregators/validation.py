"""Input checks of one round, and the round's data weights.

Everything an aggregator receives passes through here before any tensor arithmetic: each client update is
checked against the global adapter (:func:`validate_update`), the round as a whole (:func:`validate_round`)
and, when the caller computed them, the payloads the clients started from (:func:`validate_payloads`).
Bad input raises :class:`~fedlora.types.AggregationInputError` (a ``ValueError``) naming the client and
module, never a torch error. :func:`data_weights` gives the default ``p_k``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import replace

import torch
from torch import Tensor

from ..types import AggregationInputError, ClientPayload, ClientUpdate, LoRAFactors, ModuleState

GlobalState = dict[str, ModuleState]


def _check_finite(t: Tensor, what: str, client_id: str, module: str) -> None:
    # min and max propagate NaN and hold any Inf: two finite extremes mean every entry is finite, at a
    # twentieth of the cost of an elementwise isfinite (which allocates a mask as large as the factor).
    if t.numel() and not all(math.isfinite(float(v)) for v in torch.aminmax(t.detach())):
        raise AggregationInputError(f"{what} contains NaN or Inf", client_id=client_id, module=module)


def validate_update(global_state: GlobalState, update: ClientUpdate) -> ClientUpdate:
    """Check one client update against the global state; return it cast to the global dtype and device.

    Raises :class:`AggregationInputError` (a ``ValueError``) naming the client and module.
    """
    cid = update.client_id
    field_name, value = (("weight", update.weight) if update.weight is not None
                         else ("num_examples", update.num_examples))
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
    """Check a whole round: modules present, updates present, client ids unique, each update valid, some
    weight positive. Returns the updates cast to the global dtype and device."""
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


def validate_payloads(
    global_state: GlobalState,
    updates: Sequence[ClientUpdate],
    payloads: Mapping[str, Mapping[str, ClientPayload]],
) -> list[dict[str, ClientPayload]]:
    """The payload each (checked) client started from, in the order of ``updates``.

    ``payloads`` maps client id to module to payload; ids of clients not in the round are ignored. Each
    payload must cover exactly the global modules, with an adapter of the client's rank and the module's
    shape (what :meth:`Aggregator.payload` gives); else :class:`AggregationInputError` names the client.
    """
    out = []
    for u in updates:
        cid = u.client_id
        if cid not in payloads:
            raise AggregationInputError("no payload given for this client", client_id=cid)
        pay = payloads[cid]
        missing = sorted(set(global_state) - set(pay))
        extra = sorted(set(pay) - set(global_state))
        if missing or extra:
            raise AggregationInputError(
                f"payload modules do not match the global adapter (missing {missing}, unexpected {extra})",
                client_id=cid, module=(missing or extra)[0],
            )
        rank = client_rank(u)
        for name, state in global_state.items():
            p = pay[name]
            if not isinstance(p, ClientPayload):
                raise AggregationInputError(
                    f"payload is a {type(p).__name__}, expected ClientPayload", client_id=cid, module=name
                )
            if p.adapter.rank != rank or p.adapter.shape != state.factors.shape:
                raise AggregationInputError(
                    f"payload adapter has rank {p.adapter.rank} and shape {p.adapter.shape}; the client "
                    f"trained rank {rank} of shape {state.factors.shape}", client_id=cid, module=name,
                )
        out.append(dict(pay))
    return out


def _raw_weight(update: ClientUpdate) -> float:
    return float(update.weight) if update.weight is not None else float(update.num_examples)


def data_weights(updates: Sequence[ClientUpdate]) -> list[float]:
    """``p_k = w_k / sum w``, with ``w_k`` the explicit weight or else the number of examples."""
    raw = [_raw_weight(u) for u in updates]
    total = sum(raw)
    return [w / total for w in raw]


def client_rank(update: ClientUpdate) -> int:
    """The LoRA rank of a (checked) update: every module has the same."""
    return next(iter(update.factors.values())).rank
