"""HierFedLoRA's setup in a simulation: the grouping from the clients' label histograms and speeds, and the
planner's inputs from the device clock (step time, sync time and memory at every depth, group skew)."""

from __future__ import annotations

import numpy as np

from ..hier import GroupCosts, Grouping, group_clients, kl_divergence, mixed_histogram, plan_groups
from ..protocol.hierfedlora import OPTIONS, HierFedLoRA, HierOptions
from .clock import Clock


def modules_by_depth(clock: Clock) -> dict[int, list[str]]:
    """Module names in the top ``L`` blocks, for ``L = 0..num_blocks``."""
    n = clock.cost.num_blocks
    return {depth: [m for m, b in clock.blocks.items() if b >= n - depth] for depth in range(n + 1)}


def build_hierarchy(options: HierOptions, clock: Clock, histograms: dict[str, np.ndarray],
                    global_state, head, **strategy_kwargs) -> HierFedLoRA:
    """The HierFedLoRA strategy of a run: grouping, planner and the two aggregation rules."""
    rule, global_rule = options.rules(strategy_kwargs["seed"])
    ids = list(histograms)
    grouping = group_clients(histograms, options.groups, speeds={c: clock.speed(c) for c in ids},
                             divergence=options.divergence)
    at_depth = modules_by_depth(clock)
    itemsize = next(iter(global_state.values())).factors.B.element_size()
    head_bytes = sum(t.numel() * t.element_size() for t in head.values())
    global_hist = mixed_histogram(list(histograms.values()))
    ranks = strategy_kwargs["ranks"]

    def sync_bytes(cid: str, depth: int) -> float:
        r = ranks[cid]
        return head_bytes + itemsize * sum(r * sum(global_state[m].factors.shape) for m in at_depth[depth])

    def group_costs(members: list[str]) -> GroupCosts:
        depths = range(clock.cost.num_blocks + 1)
        return GroupCosts(
            step_s=[max(clock.step_seconds(c, d) for c in members) for d in depths],
            comm_s=[max(sync_bytes(c, d) / clock.profiles[c].down + sync_bytes(c, d) / clock.profiles[c].up
                        for c in members) for d in depths],
            memory=[max(clock.memory(c, d) for c in members) for d in depths],
            memory_limit=min(clock.profiles[c].memory for c in members),
            skew=kl_divergence(mixed_histogram([histograms[c] for c in members]), global_hist),
        )

    def plan_for(groups: Grouping):
        return plan_groups([group_costs(m) for m in groups.groups], group_rounds=options.group_rounds,
                           taus=options.taus, min_depth=options.min_depth)

    return HierFedLoRA(rule, global_rule, global_state, head, grouping=grouping, plan_for=plan_for,
                       modules_at_depth=lambda depth: list(at_depth[depth]), group_rounds=options.group_rounds,
                       **strategy_kwargs)


def hier_options(options: dict) -> HierOptions:
    """``federation.method_options`` of hierfedlora, unknown names refused with the valid ones listed."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ValueError(f"hierfedlora: unknown option {unknown[0]!r}; valid options: {', '.join(OPTIONS)}")
    return HierOptions(**options)
