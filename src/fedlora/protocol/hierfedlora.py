"""HierFedLoRA: near-IID groups, per-group depth and sync frequency, two levels of aggregation.

The project's design from the seed abstract (``METHODS.md``). Devices form ``G`` near-IID groups
(:mod:`fedlora.hier.grouping`); group ``g`` trains LoRA only in its top ``L_g`` blocks (plus heads) and
syncs every ``tau_g`` local steps; after ``H`` group rounds the server aggregates across groups, each module
over exactly the groups that trained it. With ``R`` the rule inside groups and ``R'`` across them, one
global round is

.. math::

    \\text{for } h = 1..H:\\quad (B_g, A_g, F_g) \\leftarrow R\\big(\\{(B_k, A_k)\\}_{k \\in g}\\big),
    \\quad F_g \\leftarrow F_g + C_g^{(h)}

    (B, A, C) \\leftarrow R'\\big(\\{(B_g, A_g)\\}_g\\big), \\qquad
    W \\leftarrow W + C + \\sum_g q_g F_g

where ``C_g`` is what an exact rule folds (the group's own frozen term ``F_g``, which its members add to
their frozen weights while the group trains) and ``q_g`` the global rule's group weights. With exact rules
at both levels (the default, FedEx-LoRA) the global model after a round is exactly
``W + sum_g q_g (F_g + s B_g A_g)``: nothing of what any group learned is lost to factor averaging. The
pairs ``(tau_g, L_g)`` come from :mod:`fedlora.hier.planner` (equal simulated time per global round), which
the runtime re-plans as measured times change; this class only runs the rounds it is given.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from .. import lowrank
from ..aggregators import Aggregator, get_aggregator
from ..aggregators.accounting import error_ratio
from ..hier import Grouping, Plan
from ..types import ClientUpdate, LowRank, ModuleState
from .messages import ClientReply, ClientTask, reply_tensor_bytes, task_tensor_bytes
from .screening import bound_replies, client_update, screen_replies
from .strategy import RoundResult, RoundStrategy, modules_by_trainers


@dataclass(kw_only=True)
class HierOptions:
    """``federation.method_options`` of ``hierfedlora``."""

    groups: int = 4  # G, near-IID groups
    group_rounds: int = 2  # H, group rounds per global round
    rule: str = "fedex"  # aggregation inside a group (any registered method)
    rule_options: dict = field(default_factory=dict)
    global_rule: str = "fedex"  # aggregation across groups
    global_rule_options: dict = field(default_factory=dict)
    taus: list[int] = field(default_factory=lambda: [5, 10, 15, 20, 30])  # candidate local steps per sync
    min_depth: int = 1  # fewest top blocks a group trains
    divergence: str = "kl"  # grouping: "kl" or "l1" to the global label histogram

    def __post_init__(self) -> None:
        checks = [
            (isinstance(self.groups, int) and self.groups >= 1, "groups must be an int >= 1"),
            (isinstance(self.group_rounds, int) and self.group_rounds >= 1, "group_rounds must be an int >= 1"),
            (isinstance(self.taus, list) and self.taus and all(isinstance(t, int) and t >= 1 for t in self.taus),
             "taus must be a non-empty list of ints >= 1"),
            (isinstance(self.min_depth, int) and self.min_depth >= 0, "min_depth must be an int >= 0"),
            (self.divergence in ("kl", "l1"), "divergence must be 'kl' or 'l1'"),
            (isinstance(self.rule_options, dict) and isinstance(self.global_rule_options, dict),
             "rule_options and global_rule_options must be mappings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"hierfedlora: {message}")

    def rules(self, seed: int) -> tuple[Aggregator, Aggregator]:
        """The inner and global aggregators (a method with a ``seed`` option follows the run's seed)."""
        built = []
        for key, name, options in (("rule", self.rule, self.rule_options),
                                   ("global_rule", self.global_rule, self.global_rule_options)):
            try:
                built.append(get_aggregator(name, **options))
            except ValueError as err:
                raise ValueError(f"hierfedlora: {key}: {err}") from None
        return built[0], built[1]


OPTIONS = {f.name: (f.default if f.default is not dataclasses.MISSING else f.default_factory())
           for f in dataclasses.fields(HierOptions)}


@dataclass
class _Group:
    """One group's state inside a global round: its adapter, head and accumulated frozen term."""

    state: dict[str, ModuleState]
    head: dict[str, torch.Tensor]
    frozen: dict[str, LowRank] = field(default_factory=dict)
    examples: int = 0
    trained: set[str] = field(default_factory=set)


class HierFedLoRA(RoundStrategy):
    """Two-level rounds over a grouping and a plan (see the module docstring).

    ``plan_for(grouping)`` returns the current :class:`~fedlora.hier.Plan` (called at the start of every
    global round, so measured times can change it); ``modules_at_depth(L)`` lists the modules of the top
    ``L`` blocks. ``events`` collects one entry each time the grouping or the plan changes.
    """

    name = "hierfedlora"

    def __init__(self, rule: Aggregator, global_rule: Aggregator, global_state, head, *, grouping: Grouping,
                 plan_for: Callable[[Grouping], Plan], modules_at_depth: Callable[[int], list[str]],
                 group_rounds: int, **kwargs):
        super().__init__(rule, global_state, head, **kwargs)
        self.global_rule = global_rule
        self.grouping = grouping
        self.plan_for = plan_for
        self.modules_at_depth = modules_at_depth
        self.exchanges_per_round = group_rounds
        self.plan: Plan | None = None
        self.last_plan: dict | None = None  # as logged
        self.events: list[dict] = [{"round": 0, "kind": "groups", "groups": grouping.groups}]
        self._groups_now: dict[int, _Group] = {}
        self._members: dict[int, list[str]] = {}
        self._loss: list[float] = []

    def lane_of(self, client_id: str) -> int:
        return self.grouping.group_of(client_id)

    # ------------------------------------------------------------ configure
    def configure_train(self, round_idx: int, clients: Sequence[str], step: int = 0) -> dict[str, ClientTask]:
        if step == 0:
            self._start_round(round_idx, clients)
        base = self.round_settings(round_idx)
        self._payloads = {}
        catch_up: dict | None = {} if step == 0 else None  # the first exchange brings clients up to date
        tasks = {}
        for g, members in self._members.items():
            group, plan = self._groups_now[g], self.plan.groups[g]
            settings = dataclasses.replace(base, local_steps=plan.tau, local_epochs=None)
            modules = self.modules_at_depth(plan.depth)
            for cid in members:
                payload = self.aggregator.payload(group.state, self.ranks[cid], round_idx)
                tasks[cid] = self._task(round_idx, cid, payload, settings, modules, catch_up, frozen=group.frozen,
                                        head=group.head)
        return tasks

    def _start_round(self, round_idx: int, clients: Sequence[str]) -> None:
        plan = self.plan_for(self.grouping)
        if plan.as_dict() != self.last_plan:
            self.last_plan = plan.as_dict()
            self.events.append({"round": round_idx + 1, "kind": "plan", "plan": self.last_plan})
        self.plan = plan
        chosen = set(clients)
        self._members = {g: [c for c in members if c in chosen] for g, members in enumerate(self.grouping.groups)}
        self._members = {g: m for g, m in self._members.items() if m}
        self._groups_now = {g: _Group(dict(self.global_state), dict(self.head)) for g in self._members}
        self._loss = []

    # ------------------------------------------------------------ aggregate
    def aggregate_train(self, round_idx: int, tasks: dict[str, ClientTask], replies: dict[str, ClientReply],
                        failed: dict[str, str] | None = None, step: int = 0) -> RoundResult:
        """Aggregate each group; on the round's last exchange, aggregate across groups too."""
        accepted, rejected = screen_replies(tasks, replies, failed, self.global_state, self.head)
        accepted, clipped = bound_replies(tasks, accepted, rejected, self.update_bound)
        ranks = {cid: tasks[cid].rank for cid in accepted}
        self._adopt_ranks(accepted)
        inner_errors = []
        for g, members in self._members.items():
            done = [c for c in members if c in accepted]
            if done:
                inner_errors.append(self._aggregate_in_group(round_idx, self._groups_now[g], done, tasks, accepted))
        self._loss += [r.train_loss for r in accepted.values()]
        result = RoundResult(
            round=round_idx + 1, clients=list(accepted), rejected=rejected, global_state=self.global_state,
            head=self.head, corrections={}, weights={}, errors={}, error=None,
            bytes_up={cid: reply_tensor_bytes(r) for cid, r in replies.items() if r is not None},
            bytes_down={cid: task_tensor_bytes(t) for cid, t in tasks.items()},
            train_loss=sum(self._loss) / len(self._loss) if self._loss else None, ranks=ranks,
            info={"inner_error": max(inner_errors) if inner_errors else None, "step": step,
                  **({"clipped": clipped} if clipped else {})},
        )
        if step == self.exchanges_per_round - 1:
            self._aggregate_groups(round_idx, result)
        return result

    def _aggregate_in_group(self, round_idx, group: _Group, done, tasks, accepted) -> float:
        modules = sorted(accepted[done[0]].factors, key=list(self.global_state).index)
        sub = {m: group.state[m] for m in modules}
        updates = [client_update(tasks[c], accepted[c], modules) for c in done]
        payloads = {c: {m: self._payloads[c][m] for m in modules} for c in done}
        res = self.aggregator.aggregate(sub, updates, round_idx, payloads=payloads, next_payloads=False,
                                        error_measure=self.error_measure)
        group.state.update(res.global_state)
        for m, c in res.corrections.items():
            group.frozen[m] = lowrank.compact(lowrank.concat([group.frozen[m], c]) if m in group.frozen else c)
        group.head = {k: sum(res.weights[c] * accepted[c].head[k] for c in done) for k in group.head}
        group.examples = max(group.examples, sum(accepted[c].num_examples for c in done))
        group.trained.update(modules)
        return res.error

    def _aggregate_groups(self, round_idx: int, result: RoundResult) -> None:
        """The global step: each module over the groups that trained it; their frozen terms fold in too."""
        ids = {g: f"group{g}" for g in self._groups_now}
        corrections: dict[str, LowRank] = {}
        errors: dict[str, float] = {}
        weights: dict[str, float] = {}
        num_sq = den_sq = 0.0
        new_state = dict(self.global_state)
        trained = {g: grp.trained for g, grp in self._groups_now.items()}
        for groups, modules in modules_by_trainers(self.global_state, trained).items():
            sub = {m: self.global_state[m] for m in modules}
            rank = next(iter(sub.values())).factors.rank
            payload = self.global_rule.payload(sub, rank, round_idx)
            updates = [ClientUpdate(client_id=ids[g], num_examples=self._groups_now[g].examples, rank=rank,
                                    factors={m: self._groups_now[g].state[m].factors for m in modules})
                       for g in groups]
            res = self.global_rule.aggregate(sub, updates, round_idx, payloads={ids[g]: payload for g in groups},
                                             next_payloads=False, error_measure=self.error_measure)
            new_state.update(res.global_state)
            for m in modules:
                terms = [res.corrections[m]] if m in res.corrections else []
                terms += [lowrank.concat([self._groups_now[g].frozen[m]], [res.weights[ids[g]]])
                          for g in groups if m in self._groups_now[g].frozen]
                if terms:
                    corrections[m] = lowrank.compact(lowrank.concat(terms))
            errors.update(res.errors)
            num_sq += res.info["error_num_sq"]
            den_sq += res.info["error_den_sq"]
            if len(res.weights) >= len(weights):
                weights = res.weights
        if weights:
            by_id = {ids[g]: grp for g, grp in self._groups_now.items()}
            self.head = {k: sum(w * by_id[i].head[k] for i, w in weights.items()) for k in self.head}
            self.global_state = new_state
        self.history.append(round_idx + 1, corrections)
        result.global_state, result.head, result.corrections = self.global_state, self.head, corrections
        result.weights, result.errors = weights, errors
        result.error = error_ratio(num_sq ** 0.5, den_sq ** 0.5) if weights else None
        result.info["groups"] = {ids[g]: self._members[g] for g in self._groups_now}

    # ------------------------------------------------------------ grouping changes
    def regroup(self, grouping: Grouping, round_idx: int) -> None:
        """Adopt a new grouping (clients joined or left), logged as an event."""
        if grouping.groups != self.grouping.groups:
            self.grouping = grouping
            self.events.append({"round": round_idx + 1, "kind": "groups", "groups": grouping.groups})

    def state(self) -> dict:
        return {**super().state(), "groups": self.grouping.groups, "plan": self.last_plan}

    def load_state(self, state: dict) -> None:
        super().load_state(state)
        self.last_plan = state.get("plan")

