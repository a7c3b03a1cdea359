"""What the server does with the replies of a round before aggregating: screen, bound, count.

:func:`screen_replies` keeps the well-formed replies and says why each other client has none (a reply for
another round or client, other modules, a malformed or non-finite factor or head, an impossible rank);
:func:`bound_replies` applies the strategy's ``update_bound`` (reject or clip an update whose norm is far
above the round's median); :func:`traffic_and_loss` counts the tensor bytes from the messages themselves.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..aggregators import validate_update
from ..privacy import bound_updates, clip_update, update_norm
from ..types import AggregationInputError, ClientUpdate, ModuleState
from .messages import ClientReply, ClientTask, reply_tensor_bytes, task_tensor_bytes


def client_update(task: ClientTask, reply: ClientReply, modules: Sequence[str]) -> ClientUpdate:
    """The aggregator's view of ``reply``, restricted to ``modules``."""
    return ClientUpdate(
        client_id=task.client_id,
        factors={m: reply.factors[m] for m in modules},
        num_examples=reply.num_examples,
        rank=reply.rank,
        label_histogram=reply.label_histogram,
    )


def screen_replies(tasks: Mapping[str, ClientTask], replies: Mapping[str, ClientReply | None],
                   failed: Mapping[str, str] | None, global_state: Mapping[str, ModuleState],
                   head: Mapping[str, Tensor]) -> tuple[dict[str, ClientReply], dict[str, str]]:
    """The well-formed replies, and why each other client of ``tasks`` has none."""
    rejected = dict(failed or {})
    accepted: dict[str, ClientReply] = {}
    for cid, task in tasks.items():
        if cid in rejected:
            continue
        reply = replies.get(cid)
        try:
            if reply is None:
                raise AggregationInputError("no reply", client_id=cid)
            check_reply(task, reply, global_state, head)
        except AggregationInputError as err:
            rejected[cid] = str(err)
        else:
            accepted[cid] = reply
    return accepted, rejected


def check_reply(task: ClientTask, reply: ClientReply, global_state: Mapping[str, ModuleState],
                head: Mapping[str, Tensor]) -> None:
    """Raise :class:`AggregationInputError` (naming the client) unless ``reply`` answers ``task``."""
    cid = task.client_id
    if reply.client_id != cid or reply.round != task.round:
        raise AggregationInputError(
            f"reply for client {reply.client_id!r} round {reply.round} answers task round {task.round}",
            client_id=cid,
        )
    expected = set(task.modules if task.modules is not None else global_state)
    if set(reply.factors) != expected:
        raise AggregationInputError(
            f"reply modules {sorted(reply.factors)[:3]}... differ from the task's", client_id=cid
        )
    sub = {m: global_state[m] for m in expected}
    validate_update(sub, client_update(task, reply, sorted(expected)))
    if set(reply.head) != set(head):
        raise AggregationInputError(f"head tensors {sorted(reply.head)} differ from {sorted(head)}", client_id=cid)
    pruned = reply.metrics.get("rank")
    if pruned is not None and not (float(pruned).is_integer() and 1 <= pruned <= task.rank):
        raise AggregationInputError(f"reported rank {pruned} is not an int in 1..{task.rank}", client_id=cid)
    for k, h in reply.head.items():
        if h.shape != head[k].shape or not torch.isfinite(h).all():
            raise AggregationInputError(f"head {k} has another shape or contains NaN or Inf", client_id=cid)


def bound_replies(tasks: Mapping[str, ClientTask], accepted: dict[str, ClientReply], rejected: dict[str, str],
                  update_bound: tuple[float, str] | None) -> tuple[dict[str, ClientReply], dict[str, float]]:
    """Apply ``update_bound`` (factor, mode): the kept (or clipped) replies, and each clipped client's norm
    before clipping; a rejected client's reason is added to ``rejected``."""
    if update_bound is None or not accepted:
        return accepted, {}
    factor, mode = update_bound
    norms = {cid: update_norm(tasks[cid].adapter, r.factors) for cid, r in accepted.items()}
    kept, clipped = {}, {}
    for cid, decision in bound_updates(norms, factor, mode).items():
        reply = accepted[cid]
        if decision.action == "keep":
            kept[cid] = reply
        elif decision.action == "reject":
            rejected[cid] = (f"client {cid!r}: update norm {decision.norm:.3g} is above {factor:g} x the median "
                             f"({decision.bound:.3g}); rejected")
        else:
            factors, _ = clip_update(tasks[cid].adapter, reply.factors, decision.bound)
            kept[cid] = dataclasses.replace(reply, factors=factors)
            clipped[cid] = decision.norm
    return {cid: kept[cid] for cid in accepted if cid in kept}, clipped


def traffic_and_loss(tasks: Mapping[str, ClientTask], replies: Mapping[str, ClientReply | None],
                     accepted: Mapping[str, ClientReply]) -> tuple[dict[str, int], dict[str, int], float | None]:
    """Tensor bytes up (every reply that came back) and down (every task sent), and the accepted replies'
    mean training loss (``None`` when none was accepted)."""
    bytes_up = {cid: reply_tensor_bytes(r) for cid, r in replies.items() if r is not None}
    bytes_down = {cid: task_tensor_bytes(t) for cid, t in tasks.items()}
    loss = float(sum(r.train_loss for r in accepted.values()) / len(accepted)) if accepted else None
    return bytes_up, bytes_down, loss
