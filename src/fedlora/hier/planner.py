"""Joint choice of each group's sync period ``tau_g`` and depth ``L_g`` for HierFedLoRA.

METHODS.md, "HierFedLoRA", part 4 (the method text is not public; this is the project's design). In a
global round group ``g`` runs ``H`` group rounds of ``tau_g`` local steps, training LoRA in its top
``L_g`` blocks, each followed by an intra-group sync, so by the device time model it lasts

.. math:: T_g = H \\, (\\tau_g \\, \\text{step}_g(L_g) + \\text{comm}_g(L_g)).

The global round waits for the slowest group, ``T = max_g T_g``; time a group does not use is wasted.

Algorithm (deterministic):

1. Candidates of group ``g``: every ``tau`` in ``taus`` times every depth ``min_depth..num_blocks``
   whose memory fits the group's smallest member (none fits: ``ValueError`` naming the group).
2. For each budget ``T`` among all candidates' round times: every group takes its candidate of most
   progress with ``T_g <= T`` (ties: the shorter one); budgets some group cannot meet are skipped.
3. The plan is the budget of most total progress per second ``sum_g progress_g / T`` (ties: the smaller
   ``T``).

Step 3 is what equalises: a group far below ``T`` would be idle, so the best budget is one that every
group fills, except a group whose progress more time would not raise (all its candidates are shorter, or
more steps would only add drift). A slow group fits less in the budget: a smaller depth or ``tau``.

Progress model (:func:`default_progress`, override with ``progress=``): ``depth * tau_eff`` with
``tau_eff = tau / (1 + (skew * tau)^2)``, ``skew`` = ``KL(group || global)`` in nats. Each trained block
counts the same (only the relative scale matters). For ``skew * tau << 1`` local steps count fully (local
SGD on IID data is nearly as good as large-batch SGD); beyond that the drift toward the group's own label
mix, which grows with both ``tau`` and the heterogeneity (client drift: Karimireddy et al., SCAFFOLD,
2020, arXiv:1910.06378), takes over. The simplest form of that shape: ``tau_eff`` peaks at ``tau = 1 / skew``
(20-200 steps for near-IID groups of KL 0.005-0.05, 1 step for a single client of KL 1) and then falls.
Deviation from a model merely saturating in ``tau`` (``tau / (1 + skew * tau)``): with that, progress
never falls, so every group fills whatever budget the slowest group sets with more steps, and a skewed
group took the same ``tau`` as an IID one of equal costs. With the peak, an IID group takes the largest
``tau`` that fits and a skewed group stops near ``1 / skew``: groups closer to IID get larger ``tau``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

Progress = Callable[[int, int, float], float]


def default_progress(tau: int, depth: int, skew: float) -> float:
    """``depth * tau / (1 + (skew * tau)^2)``: modelled progress of one group round (module docstring)."""
    return depth * tau / (1.0 + (skew * tau) ** 2)


@dataclass(frozen=True)
class GroupCosts:
    """What the planner knows of one group (from the device time model; all functions of the depth L).

    Parameters
    ----------
    step_s : Sequence[float]
        ``step_s[L]``: seconds of one local step of the group's slowest member at depth ``L``
        (``L = 0..num_blocks``; index 0 = heads only), ``> 0``.
    comm_s : Sequence[float]
        ``comm_s[L]``: seconds of one group sync (down and up) over its slowest link, ``>= 0``.
    memory : Sequence[float]
        ``memory[L]``: bytes needed at depth ``L`` (max over members, or as given).
    memory_limit : float
        Bytes of the group's smallest member.
    skew : float
        ``KL(group || global)`` in nats, ``>= 0``.
    """

    step_s: Sequence[float]
    comm_s: Sequence[float]
    memory: Sequence[float]
    memory_limit: float
    skew: float

    def __post_init__(self):
        n = len(self.step_s)
        if n < 1 or len(self.comm_s) != n or len(self.memory) != n:
            raise ValueError(f"step_s, comm_s and memory need one entry per depth 0..num_blocks, got lengths "
                             f"{len(self.step_s)}, {len(self.comm_s)}, {len(self.memory)}")
        if not all(s > 0 and math.isfinite(s) for s in self.step_s):
            raise ValueError(f"step_s must be finite and > 0, got {list(self.step_s)}")
        if not all(c >= 0 and math.isfinite(c) for c in self.comm_s):
            raise ValueError(f"comm_s must be finite and >= 0, got {list(self.comm_s)}")
        if not all(m >= 0 for m in self.memory):
            raise ValueError(f"memory must be >= 0, got {list(self.memory)}")
        if not self.memory_limit >= 0:
            raise ValueError(f"memory_limit must be >= 0, got {self.memory_limit}")
        if not self.skew >= 0 or not math.isfinite(self.skew):
            raise ValueError(f"skew must be finite and >= 0, got {self.skew}")

    @property
    def num_blocks(self) -> int:
        """Depth of the whole model (largest ``L``)."""
        return len(self.step_s) - 1


@dataclass(frozen=True)
class GroupPlan:
    """One group's choice.

    Parameters
    ----------
    tau : int
        Local steps between intra-group syncs.
    depth : int
        ``L_g``: top blocks trained.
    round_s : float
        Simulated seconds of one global round for this group, ``H * (tau * step_s[depth] + comm_s[depth])``.
    progress : float (default: 0.0)
        The progress model's value of one group round (0 when not known).
    """

    tau: int
    depth: int
    round_s: float
    progress: float = 0.0


@dataclass(frozen=True)
class Plan:
    """Every group's ``(tau, depth)`` and the global round time.

    Parameters
    ----------
    groups : list of GroupPlan
        One per group, in the order of the costs.
    round_s : float
        Seconds of a global round: the max over groups.
    """

    groups: list[GroupPlan]
    round_s: float

    @property
    def choices(self) -> list[tuple[int, int]]:
        """``(tau, depth)`` per group."""
        return [(g.tau, g.depth) for g in self.groups]

    @property
    def progress_per_s(self) -> float:
        """Summed progress of the groups over the round time."""
        return sum(g.progress for g in self.groups) / self.round_s

    def as_dict(self) -> dict:
        """JSON-able summary for logging."""
        return {"round_s": float(self.round_s), "progress_per_s": float(self.progress_per_s),
                "groups": [{k: (int(v) if k in ("tau", "depth") else float(v)) for k, v in asdict(g).items()}
                           for g in self.groups]}


def _check_options(costs: Sequence[GroupCosts], group_rounds: int, taus: Sequence[int], min_depth: int):
    """``ValueError`` on options :func:`plan_groups` cannot use."""
    if not costs:
        raise ValueError("plan_groups needs at least one group")
    num_blocks = {c.num_blocks for c in costs}
    if len(num_blocks) != 1:
        raise ValueError(f"groups disagree on the number of blocks: {sorted(num_blocks)}")
    if isinstance(group_rounds, bool) or not isinstance(group_rounds, (int, np.integer)) or group_rounds < 1:
        raise ValueError(f"group_rounds must be an integer >= 1, got {group_rounds!r}")
    if not taus or any(isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 1 for t in taus):
        raise ValueError(f"taus must be a non-empty list of integers >= 1, got {list(taus)!r}")
    if not 0 <= min_depth <= costs[0].num_blocks:
        raise ValueError(f"min_depth must be in [0, {costs[0].num_blocks}], got {min_depth}")


def _group_plan(cost: GroupCosts, tau: int, depth: int, group_rounds: int, progress: Progress) -> GroupPlan:
    """Round time and progress of one ``(tau, depth)``."""
    value = float(progress(int(tau), int(depth), float(cost.skew)))
    if not value >= 0 or not math.isfinite(value):
        raise ValueError(f"progress({tau}, {depth}, {cost.skew}) must be finite and >= 0, got {value}")
    round_s = group_rounds * (tau * cost.step_s[depth] + cost.comm_s[depth])
    return GroupPlan(int(tau), int(depth), float(round_s), value)


def _candidates(index: int, cost: GroupCosts, group_rounds: int, taus: Sequence[int], min_depth: int,
                progress: Progress) -> list[GroupPlan]:
    """The group's candidates by increasing round time, then decreasing progress."""
    depths = [d for d in range(min_depth, cost.num_blocks + 1) if cost.memory[d] <= cost.memory_limit]
    if not depths:
        raise ValueError(f"group {index}: no depth in [{min_depth}, {cost.num_blocks}] fits its memory limit "
                         f"{cost.memory_limit} (needs {min(cost.memory[min_depth:])} at least)")
    plans = [_group_plan(cost, t, d, group_rounds, progress) for t in sorted(set(taus)) for d in depths]
    return sorted(plans, key=lambda p: (p.round_s, -p.progress, -p.depth, p.tau))


def plan_groups(costs: Sequence[GroupCosts], *, group_rounds: int, taus: Sequence[int], min_depth: int = 1,
                progress: Progress | None = None) -> Plan:
    """Pick ``(tau_g, L_g)`` per group by the algorithm of the module docstring.

    Parameters
    ----------
    costs : Sequence[GroupCosts]
        One per group, all with the same number of blocks.
    group_rounds : int
        ``H``: group rounds (each ``tau_g`` steps and one sync) per global round, ``>= 1``.
    taus : Sequence[int]
        Candidate sync periods, each ``>= 1``.
    min_depth : int (default: 1)
        Smallest depth considered; 0 allows training the heads only.
    progress : callable or None (default: None)
        ``progress(tau, depth, skew) -> float >= 0`` of one group round; ``None``:
        :func:`default_progress`.

    Returns
    -------
    Plan
        The groups' choices; ``round_s`` is the longest group's round.
    """
    _check_options(costs, group_rounds, taus, min_depth)
    progress = default_progress if progress is None else progress
    per_group = [_candidates(i, c, group_rounds, taus, min_depth, progress) for i, c in enumerate(costs)]

    # For budget T a group takes the best of its candidates with round_s <= T: a running argmax over its
    # candidates by round time (strictly more progress needed, so ties keep the shorter one).
    times, best_upto = [], []
    for plans in per_group:
        times.append(np.array([p.round_s for p in plans]))
        best, running = [], 0
        for k, p in enumerate(plans):
            if p.progress > plans[running].progress:
                running = k
            best.append(running)
        best_upto.append(best)

    floor = max(t[0] for t in times)  # the shortest budget every group can meet
    budgets = np.unique(np.concatenate(times))
    chosen, best_rate = None, 0.0
    for budget in budgets[budgets >= floor]:  # ascending: ties keep the smaller budget
        picks = [plans[best[int(np.searchsorted(t, budget, side="right")) - 1]]
                 for plans, best, t in zip(per_group, best_upto, times, strict=True)]
        rate = sum(p.progress for p in picks) / budget
        if chosen is None or rate > best_rate * (1 + 1e-12):  # rates are >= 0
            chosen, best_rate = picks, rate
    return Plan(chosen, max(p.round_s for p in chosen))


def fixed_plan(costs: Sequence[GroupCosts], choices: Sequence[tuple[int, int]], *, group_rounds: int,
               progress: Progress | None = None) -> Plan:
    """The plan of given ``(tau, depth)`` per group (a baseline, or a kept plan under new costs).

    Parameters
    ----------
    costs : Sequence[GroupCosts]
        One per group.
    choices : Sequence[tuple[int, int]]
        ``(tau, depth)`` per group; the memory limit is not checked.
    group_rounds : int
        ``H``, ``>= 1``.
    progress : callable or None (default: None)
        As in :func:`plan_groups`.

    Returns
    -------
    Plan
        Round times and progress of those choices.
    """
    if len(choices) != len(costs):
        raise ValueError(f"need one (tau, depth) per group: {len(costs)} groups, {len(choices)} choices")
    _check_options(costs, group_rounds, [t for t, _ in choices] or [1], 0)
    progress = default_progress if progress is None else progress
    for index, (cost, (_, depth)) in enumerate(zip(costs, choices, strict=True)):
        if not 0 <= depth <= cost.num_blocks:
            raise ValueError(f"group {index}: depth must be in [0, {cost.num_blocks}], got {depth}")
    groups = [_group_plan(c, t, d, group_rounds, progress) for c, (t, d) in zip(costs, choices, strict=True)]
    return Plan(groups, max(g.round_s for g in groups))


def replan(previous: Plan | None, costs: Sequence[GroupCosts], *, min_gain: float = 0.0,
           **kwargs) -> tuple[Plan, bool]:
    """Plan again as measured costs change; report whether any group's ``(tau, depth)`` changed.

    Parameters
    ----------
    previous : Plan or None
        The plan in use; ``None`` on the first call.
    costs : Sequence[GroupCosts]
        The current costs, one per group.
    min_gain : float (default: 0.0)
        Hysteresis, ``>= 0``: keep the previous choices (re-costed) unless the new plan's progress per
        second beats theirs by more than this fraction, so that noisy measurements do not flip the plan
        every round. Choices no longer allowed (memory, ``taus``, ``min_depth``) are always replaced.
    **kwargs
        Passed to :func:`plan_groups` (``group_rounds``, ``taus``, ``min_depth``, ``progress``).

    Returns
    -------
    tuple of (Plan, bool)
        The plan to use (with round times under ``costs``) and whether its choices differ from
        ``previous``'s.
    """
    if not min_gain >= 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")
    plan = plan_groups(costs, **kwargs)
    if previous is None or len(previous.groups) != len(plan.groups):
        return plan, True
    if plan.choices == previous.choices:
        return plan, False
    allowed_taus, min_depth = set(kwargs["taus"]), kwargs.get("min_depth", 1)
    fits = all(t in allowed_taus and min_depth <= d <= c.num_blocks and c.memory[d] <= c.memory_limit
               for c, (t, d) in zip(costs, previous.choices, strict=True))
    if min_gain > 0 and fits:
        kept = fixed_plan(costs, previous.choices, group_rounds=kwargs["group_rounds"],
                          progress=kwargs.get("progress"))
        if plan.progress_per_s <= kept.progress_per_s * (1.0 + min_gain):
            return kept, False
    return plan, True
