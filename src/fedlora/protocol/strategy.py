"""The server side of a round, shaped like Flower's ``Strategy``: ``configure_train`` then ``aggregate_train``.

:class:`RoundStrategy` wraps any registered aggregator. Per round it

1. builds one :class:`~fedlora.protocol.messages.ClientTask` per sampled client: the client's payload
   (computed once, at its own rank), the head, the training settings, the seed stream, the proximal weight,
   and the correction to the frozen weights the client lacks since it last took part (from the versioned
   :class:`~fedlora.protocol.history.CorrectionHistory`, as compressed factors);
2. checks every reply (a malformed or non-finite one is rejected, with the reason), aggregates each module
   over the clients that trained it (one aggregator call per group of modules trained by the same clients:
   one call when every client trains every module), averages the heads with the same weights, appends the
   round's corrections to the history, and counts bytes from the messages themselves.

A runtime moves the tasks and replies (:mod:`fedlora.protocol.runtime`); the strategy never trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..aggregators import Aggregator, validate_update
from ..aggregators.accounting import error_ratio
from ..types import AggregationInputError, ClientPayload, ClientUpdate, LowRank, ModuleState
from .history import CorrectionHistory
from .messages import ClientReply, ClientTask, TrainSettings, reply_tensor_bytes, task_tensor_bytes


@dataclass
class RoundResult:
    """What one round changed, and what it cost.

    ``bytes_down[c]`` / ``bytes_up[c]`` are the tensor payloads of client ``c``'s task and reply, exactly
    the tensor bytes of their serialised messages (headers and JSON come on top; a runtime that serialises
    reports them in ``header_bytes``).
    """

    round: int
    clients: list[str]
    rejected: dict[str, str]
    global_state: dict[str, ModuleState]
    head: dict[str, Tensor]
    corrections: dict[str, LowRank]
    weights: dict[str, float]
    errors: dict[str, float]
    error: float | None
    bytes_up: dict[str, int]
    bytes_down: dict[str, int]
    train_loss: float | None
    header_bytes: dict[str, int] = field(default_factory=dict)


class RoundStrategy:
    """Configure and aggregate rounds of one federation (any registered aggregator).

    Parameters
    ----------
    aggregator : Aggregator
        The aggregation method.
    global_state, head : dict
        The global adapter per module and the head tensors at the start (or at the resumed round).
    train : TrainSettings
        Local training settings sent with every task.
    ranks : dict
        Each client's LoRA rank.
    seed : int
        The run's seed; a client's stream is ``[seed, round, client_index]``.
    history : CorrectionHistory
        Corrections folded so far (rounds ``1..history.latest``).
    synced : dict, optional
        The correction version each client's frozen weights are at (0 for a client never seen).
    modules_for : callable, optional
        ``modules_for(client_id, round_idx) -> list of module names or None`` (all): the modules a client
        trains in a round (a depth); None trains every module.
    """

    def __init__(
        self,
        aggregator: Aggregator,
        global_state: dict[str, ModuleState],
        head: dict[str, Tensor],
        *,
        train: TrainSettings,
        ranks: dict[str, int],
        seed: int,
        history: CorrectionHistory | None = None,
        synced: dict[str, int] | None = None,
        modules_for=None,
    ):
        self.aggregator = aggregator
        self.global_state = global_state
        self.head = head
        self.train = train
        self.ranks = dict(ranks)
        self.index = {cid: i for i, cid in enumerate(ranks)}
        self.seed = seed
        self.history = history if history is not None else CorrectionHistory()
        self.synced = dict(synced or {})
        self.modules_for = modules_for
        self._payloads: dict[str, dict[str, ClientPayload]] = {}

    # ------------------------------------------------------------ configure
    def configure_train(self, round_idx: int, clients: Sequence[str]) -> dict[str, ClientTask]:
        """One task per client of this round (0-based ``round_idx``)."""
        train_a, train_b = self.aggregator.trains(round_idx)
        mu = float(self.aggregator.proximal_mu)
        self._payloads = {}
        catch_up: dict[int, dict[str, LowRank]] = {}  # clients at one version share one (read, compressed) sum
        tasks = {}
        for cid in clients:
            rank = self.ranks[cid]
            payload = self.aggregator.payload(self.global_state, rank, round_idx)
            self._payloads[cid] = payload
            version = self.synced.get(cid, 0)
            if version not in catch_up:
                catch_up[version] = self.history.since(version)
            modules = self.modules_for(cid, round_idx) if self.modules_for is not None else None
            tasks[cid] = ClientTask(
                round=round_idx,
                client_id=cid,
                rank=rank,
                adapter={m: p.adapter for m, p in payload.items()},
                frozen={m: p.frozen for m, p in payload.items() if p.frozen is not None and p.frozen.rank > 0},
                train_a=train_a,
                train_b=train_b,
                modules=modules,
                head=self.head,
                train=self.train,
                proximal_mu=mu,
                seed=[self.seed, round_idx, self.index[cid]],
                catch_up=catch_up[version],
                catch_up_from=version,
                catch_up_to=self.history.latest,
            )
            self.synced[cid] = self.history.latest
        return tasks

    # ------------------------------------------------------------ aggregate
    def aggregate_train(
        self, round_idx: int, tasks: dict[str, ClientTask], replies: dict[str, ClientReply],
        failed: dict[str, str] | None = None,
    ) -> RoundResult:
        """Check the replies, aggregate, and advance the global state and history by one round."""
        rejected = dict(failed or {})
        accepted: dict[str, ClientReply] = {}
        for cid, task in tasks.items():
            if cid in rejected:
                continue
            reply = replies.get(cid)
            try:
                if reply is None:
                    raise AggregationInputError("no reply", client_id=cid)
                self._check_reply(task, reply)
            except AggregationInputError as err:
                rejected[cid] = str(err)
            else:
                accepted[cid] = reply
        bytes_down = {cid: task_tensor_bytes(t) for cid, t in tasks.items()}
        bytes_up = {cid: reply_tensor_bytes(r) for cid, r in replies.items() if r is not None}

        corrections: dict[str, LowRank] = {}
        weights: dict[str, float] = {}
        errors: dict[str, float] = {}
        num_sq = den_sq = 0.0  # the error's sums over all groups, as aggregate() forms them for one
        new_state = dict(self.global_state)
        if accepted:
            for group, modules in self._groups(tasks, accepted).items():
                result = self._aggregate_group(round_idx, group, modules, tasks, accepted)
                for m in modules:
                    new_state[m] = result.global_state[m]
                corrections.update(result.corrections)
                errors.update(result.errors)
                num_sq += result.info["error_num_sq"]
                den_sq += result.info["error_den_sq"]
                if len(result.weights) >= len(weights):  # the widest group's weights serve the heads
                    weights = result.weights
            error = error_ratio(math.sqrt(num_sq), math.sqrt(den_sq))
            self.head = {k: sum(weights[cid] * accepted[cid].head[k] for cid in weights) for k in self.head}
            self.global_state = new_state
            train_loss = float(sum(accepted[c].train_loss for c in accepted) / len(accepted))
        else:
            error, train_loss = None, None
        self.history.append(round_idx + 1, corrections)
        return RoundResult(
            round=round_idx + 1, clients=list(accepted), rejected=rejected, global_state=self.global_state,
            head=self.head, corrections=corrections, weights=weights, errors=errors, error=error,
            bytes_up=bytes_up, bytes_down=bytes_down, train_loss=train_loss,
        )

    def _check_reply(self, task: ClientTask, reply: ClientReply) -> None:
        cid = task.client_id
        if reply.client_id != cid or reply.round != task.round:
            raise AggregationInputError(
                f"reply for client {reply.client_id!r} round {reply.round} answers task round {task.round}",
                client_id=cid,
            )
        expected = set(task.modules if task.modules is not None else self.global_state)
        if set(reply.factors) != expected:
            raise AggregationInputError(
                f"reply modules {sorted(reply.factors)[:3]}... differ from the task's", client_id=cid
            )
        sub = {m: self.global_state[m] for m in expected}
        validate_update(sub, self._update(task, reply, sorted(expected)))
        if set(reply.head) != set(self.head):
            raise AggregationInputError(f"head tensors {sorted(reply.head)} differ from {sorted(self.head)}",
                                        client_id=cid)
        for k, h in reply.head.items():
            if h.shape != self.head[k].shape or not torch.isfinite(h).all():
                raise AggregationInputError(f"head {k} has another shape or contains NaN or Inf", client_id=cid)

    def _update(self, task: ClientTask, reply: ClientReply, modules: Sequence[str]) -> ClientUpdate:
        return ClientUpdate(
            client_id=task.client_id,
            factors={m: reply.factors[m] for m in modules},
            num_examples=reply.num_examples,
            rank=reply.rank,
            label_histogram=reply.label_histogram,
        )

    def _groups(self, tasks, accepted) -> dict[tuple[str, ...], list[str]]:
        """Modules keyed by the clients (in task order) that trained them."""
        groups: dict[tuple[str, ...], list[str]] = {}
        for m in self.global_state:
            trained_by = tuple(c for c in accepted if m in accepted[c].factors)
            if trained_by:
                groups.setdefault(trained_by, []).append(m)
        return groups

    def _aggregate_group(self, round_idx, group, modules, tasks, accepted):
        sub = {m: self.global_state[m] for m in modules}
        updates = [self._update(tasks[c], accepted[c], modules) for c in group]
        payloads = {c: {m: self._payloads[c][m] for m in modules} for c in group}
        return self.aggregator.aggregate(sub, updates, round_idx, payloads=payloads, next_payloads=False)

