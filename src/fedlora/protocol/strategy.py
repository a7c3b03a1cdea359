"""The server side of a round, shaped like Flower's ``Strategy``: ``configure_train`` then ``aggregate_train``.

:class:`RoundStrategy` wraps any registered aggregator. Per round it

1. builds one :class:`~fedlora.protocol.messages.ClientTask` per sampled client: the client's payload
   (computed once, at its own rank), the head, the training settings, the seed stream, the proximal weight,
   and the correction to the frozen weights the client lacks since it last took part (from the versioned
   :class:`~fedlora.protocol.history.CorrectionHistory`, as compressed factors);
2. checks every reply (:mod:`~fedlora.protocol.screening`: a malformed or non-finite one is rejected, with
   the reason), aggregates each module over the clients that trained it (one aggregator call per group of
   modules trained by the same clients: one call when every client trains every module), averages the heads
   with the same weights, appends the round's corrections to the history, and counts bytes from the messages
   themselves.

A runtime moves the tasks and replies (:mod:`fedlora.protocol.runtime`); the strategy never trains.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor

from .. import lowrank, seeds
from ..aggregators import Aggregator
from ..aggregators.accounting import error_ratio
from ..privacy import ClientDP, release
from ..types import ClientPayload, LowRank, ModuleState
from .history import CorrectionHistory
from .messages import ClientReply, ClientTask, TrainSettings
from .schedule import round_lr
from .screening import bound_replies, client_update, screen_replies, traffic_and_loss


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
    ranks: dict[str, int] = field(default_factory=dict)  # each accepted client's rank this round
    rank_energy: float | None = None  # share of the update's energy above the smallest client rank
    info: dict = field(default_factory=dict)  # what a strategy adds (JSON-able)


def modules_by_trainers(modules, trained) -> dict[tuple, list[str]]:
    """``modules`` keyed by the trainers (in the order of ``trained``: trainer -> modules it trained) that
    trained each; a module nobody trained is left out. One aggregation call serves each key."""
    keyed: dict[tuple, list[str]] = {}
    for m in modules:
        by = tuple(t for t, done in trained.items() if m in done)
        if by:
            keyed.setdefault(by, []).append(m)
    return keyed


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
    update_bound : (factor, mode), optional
        Guard against absurd updates (:func:`fedlora.privacy.bound_updates`): an accepted update whose norm
        ``||s (B A - B_0 A_0)||`` is above ``factor`` x the exchange's median is clipped to that bound
        (``mode="clip"``, recorded in ``info["clipped"]``) or rejected (``"reject"``, logged like any other).
    privacy : dict, optional
        Each client's DP-SGD settings (``noise_multiplier``, ``clip``, ``sample_rate``, ``delta``,
        ``accountant``), sent in its task's ``privacy`` field so every runtime applies them.
    client_dp : ClientDP, optional
        Client-level DP at the server (:mod:`fedlora.privacy.client_level`): the replies are clipped and the
        round releases their noisy fixed-denominator mean, split as FRA with ``fold_tail`` does; the
        aggregator's own combination is not used.
    error_measure : str (default: "exact")
        How each aggregation measures its error (:meth:`fedlora.aggregators.Aggregator.aggregate`): ``"exact"``
        in float64 from the factors, ``"core"`` from the small core where the method's algebra allows.
    lr_schedule, rounds : str, int (default: "constant", None)
        The learning rate across the run's ``rounds`` (:mod:`fedlora.protocol.schedule`): each round's tasks
        carry ``train.lr`` scaled for that round.

    A round is ``exchanges_per_round`` exchanges (one here; a hierarchical strategy makes more): for each
    ``step``, ``configure_train`` then ``aggregate_train``, and the last step's result is the round's.
    ``lane_of(client)`` says which clients' times add up across a round's exchanges (one lane here: a
    synchronous round lasts as long as its slowest client).
    """

    exchanges_per_round = 1

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
        update_bound: tuple[float, str] | None = None,
        privacy: dict[str, dict] | None = None,
        client_dp: ClientDP | None = None,
        error_measure: str = "exact",
        lr_schedule: str = "constant",
        rounds: int | None = None,
    ):
        if lr_schedule != "constant" and rounds is None:
            raise ValueError(f"lr schedule {lr_schedule!r} needs the run's number of rounds")
        self.aggregator = aggregator
        self.lr_schedule = lr_schedule
        self.rounds = rounds
        self.error_measure = error_measure
        self.client_dp = client_dp
        self.update_bound = update_bound
        self.privacy = dict(privacy or {})
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
    def lr_at(self, round_idx: int) -> float:
        """This round's learning rate (:func:`~fedlora.protocol.schedule.round_lr`)."""
        if self.lr_schedule == "constant":
            return self.train.lr
        return round_lr(self.train.lr, self.lr_schedule, round_idx, self.rounds)

    def round_settings(self, round_idx: int) -> TrainSettings:
        """The local training of every client in this round: the run's settings at this round's learning rate,
        plus what the method asks of every client."""
        method_asks = self.aggregator.local_training(round_idx)
        return dataclasses.replace(self.train, lr=self.lr_at(round_idx), **method_asks)

    def configure_train(self, round_idx: int, clients: Sequence[str], step: int = 0) -> dict[str, ClientTask]:
        """One task per client of this round (0-based ``round_idx``; ``step`` < ``exchanges_per_round``)."""
        settings = self.round_settings(round_idx)
        self._payloads = {}
        catch_up: dict[int, dict[str, LowRank]] = {}  # clients at one version share one (read, compressed) sum
        tasks = {}
        for cid in clients:
            payload = self.aggregator.payload(self.global_state, self.ranks[cid], round_idx)
            modules = self.modules_for(cid, round_idx) if self.modules_for is not None else None
            tasks[cid] = self._task(round_idx, cid, payload, settings, modules, catch_up)
        return tasks

    def _task(self, round_idx: int, cid: str, payload: dict[str, ClientPayload], settings: TrainSettings,
              modules: list[str] | None, catch_up: dict[int, dict[str, LowRank]] | None,
              frozen: dict[str, LowRank] | None = None, head: dict[str, Tensor] | None = None) -> ClientTask:
        """Client ``cid``'s task from its payload; ``frozen`` adds terms to the payload's own frozen ones,
        ``head`` replaces the global head (a group's).

        ``catch_up`` caches each version's correction sum; None sends none (a later exchange of a round
        whose first exchange caught the client up).
        """
        train_a, train_b = self.aggregator.trains(round_idx)
        self._payloads[cid] = payload
        version = self.synced.get(cid, 0)
        if catch_up is not None and version not in catch_up:
            catch_up[version] = self.history.since(version)
        terms = {m: p.frozen for m, p in payload.items() if p.frozen is not None and p.frozen.rank > 0}
        for m, extra in (frozen or {}).items():
            if extra.rank > 0:
                terms[m] = lowrank.concat([terms[m], extra]) if m in terms else extra
        task = ClientTask(
            round=round_idx,
            client_id=cid,
            rank=self.ranks[cid],
            adapter={m: p.adapter for m, p in payload.items()},
            frozen=terms,
            train_a=train_a,
            train_b=train_b,
            modules=modules,
            head=self.head if head is None else head,
            train=settings,
            proximal_mu=float(self.aggregator.proximal_mu),
            seed=[self.seed, round_idx, self.index[cid]],
            catch_up=catch_up[version] if catch_up is not None else {},
            catch_up_from=version,
            catch_up_to=self.history.latest,
            privacy=dict(self.privacy.get(cid, {})),
        )
        self.synced[cid] = self.history.latest
        return task

    # ------------------------------------------------------------ aggregate
    def aggregate_train(
        self, round_idx: int, tasks: dict[str, ClientTask], replies: dict[str, ClientReply],
        failed: dict[str, str] | None = None, step: int = 0,
    ) -> RoundResult:
        """Check the replies, aggregate, and advance the global state and history by one round."""
        accepted, rejected = screen_replies(tasks, replies, failed, self.global_state, self.head)
        if self.client_dp is not None:
            return self._release(round_idx, tasks, replies, accepted, rejected)
        accepted, clipped = bound_replies(tasks, accepted, rejected, self.update_bound)
        round_ranks = {cid: tasks[cid].rank for cid in accepted}
        cut = self.energy_rank()  # the ranks this round trained at, before any client pruned
        self._adopt_ranks(accepted)
        bytes_up, bytes_down, train_loss = traffic_and_loss(tasks, replies, accepted)

        corrections: dict[str, LowRank] = {}
        weights: dict[str, float] = {}
        errors: dict[str, float] = {}
        sums = dict.fromkeys(("error_num_sq", "error_den_sq", "energy_above_sq", "energy_sq"), 0.0)
        new_state = dict(self.global_state)
        energy = None
        if accepted:
            trained = {c: reply.factors for c, reply in accepted.items()}  # in task order
            for group, modules in modules_by_trainers(self.global_state, trained).items():
                result = self._aggregate_group(round_idx, group, modules, tasks, accepted, cut)
                for m in modules:
                    new_state[m] = result.global_state[m]
                corrections.update(result.corrections)
                errors.update(result.errors)
                for key in sums:  # the measurements' sums over all groups, as aggregate() forms them for one
                    sums[key] += result.info.get(key, 0.0)
                if len(result.weights) >= len(weights):  # the widest group's weights serve the heads
                    weights = result.weights
            error = error_ratio(math.sqrt(sums["error_num_sq"]), math.sqrt(sums["error_den_sq"]))
            if cut is not None:
                energy = sums["energy_above_sq"] / sums["energy_sq"] if sums["energy_sq"] > 0 else 0.0
            self.head = {k: sum(weights[cid] * accepted[cid].head[k] for cid in weights) for k in self.head}
            self.global_state = new_state
        else:
            error = None
        self.history.append(round_idx + 1, corrections)
        return RoundResult(
            round=round_idx + 1, clients=list(accepted), rejected=rejected, global_state=self.global_state,
            head=self.head, corrections=corrections, weights=weights, errors=errors, error=error,
            bytes_up=bytes_up, bytes_down=bytes_down, train_loss=train_loss, ranks=round_ranks,
            rank_energy=energy, info={"clipped": clipped} if clipped else {},
        )

    def _release(self, round_idx, tasks, replies, accepted, rejected) -> RoundResult:
        """The client-level DP round: every accepted reply clipped, the noisy mean released (even of none)."""
        start = {m: st.factors for m, st in self.global_state.items()}
        out = release(self.client_dp, start, self.head, {c: (r.factors, r.head) for c, r in accepted.items()},
                      seeds.integer([self.seed, round_idx], "client_dp_noise"))
        self.global_state = {m: dataclasses.replace(st, factors=out.factors[m]) for m, st in self.global_state.items()}
        self.head = out.head
        self.history.append(round_idx + 1, out.tails)
        m = self.client_dp.expected_clients
        info = {"clipped": out.clipped} if out.clipped else {}
        bytes_up, bytes_down, train_loss = traffic_and_loss(tasks, replies, accepted)
        return RoundResult(
            round=round_idx + 1, clients=list(accepted), rejected=rejected, global_state=self.global_state,
            head=self.head, corrections=out.tails, weights={c: 1.0 / m for c in accepted},
            errors=out.errors, error=out.error, bytes_up=bytes_up, bytes_down=bytes_down, train_loss=train_loss,
            ranks={c: tasks[c].rank for c in accepted}, info=info,
        )

    def energy_rank(self) -> int | None:
        """The smallest client rank when ranks differ (the rank-energy diagnostic's cut), else None."""
        ranks = set(self.ranks.values())
        return min(ranks) if len(ranks) > 1 else None

    def lane_of(self, client_id: str) -> int:
        return 0

    def state(self) -> dict:
        """What a checkpoint keeps of the strategy beyond the global adapter (JSON-able)."""
        return {"synced": dict(self.synced), "ranks": dict(self.ranks)}

    def resync(self, versions: dict[str, int]) -> None:
        """Clients hold the frozen weights of these round versions (as their runtime reported): their next
        task carries the corrections since then; a version this server never reached counts as the base
        model (0), which the client then restores."""
        for cid, version in versions.items():
            self.synced[cid] = version if 0 <= version <= self.history.latest else 0

    def load_state(self, state: dict) -> None:
        self.synced = {cid: int(v) for cid, v in state.get("synced", {}).items()}
        self.ranks.update({cid: int(r) for cid, r in state.get("ranks", {}).items()})

    def _adopt_ranks(self, accepted: dict[str, ClientReply]) -> None:
        """A client that pruned (``metrics["rank"]``) trains its new rank from now on."""
        for cid, reply in accepted.items():
            if "rank" in reply.metrics:
                self.ranks[cid] = int(reply.metrics["rank"])

    def _aggregate_group(self, round_idx, group, modules, tasks, accepted, energy_rank=None):
        sub = {m: self.global_state[m] for m in modules}
        updates = [client_update(tasks[c], accepted[c], modules) for c in group]
        payloads = {c: {m: self._payloads[c][m] for m in modules} for c in group}
        return self.aggregator.aggregate(sub, updates, round_idx, payloads=payloads, next_payloads=False,
                                         energy_rank=energy_rank, error_measure=self.error_measure)
