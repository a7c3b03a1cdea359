"""Joint (tau, depth) planner: hand-checked plans, memory limits, skew, re-planning, errors."""

import json

import pytest

from fedlora.hier import GroupCosts, GroupPlan, Plan, default_progress, fixed_plan, plan_groups, replan


def costs(step_fwd=1.0, step_bwd=0.5, comm=(2.0, 0.5), num_blocks=4, skew=0.0, memory_limit=100.0, slow=1.0):
    """Device-time-model-shaped costs: step = slow * (fwd + bwd * L), comm = c0 + c1 * L, memory = L."""
    return GroupCosts(step_s=[slow * (step_fwd + step_bwd * L) for L in range(num_blocks + 1)],
                      comm_s=[comm[0] + comm[1] * L for L in range(num_blocks + 1)],
                      memory=[float(L) for L in range(num_blocks + 1)], memory_limit=memory_limit, skew=skew)


# --- hand-checked plans --------------------------------------------------------------------------------

def test_slow_group_gets_smaller_depth_hand_case():
    # H = 1, comm 1 s, skew 0 (progress = depth * tau), step 1 + 0.5 L (fast) and 4x that (slow).
    # round_s = tau * step + 1:
    #   fast tau 4: L1..4 -> 7, 9, 11, 13 s (progress 4, 8, 12, 16); tau 8: 13, 17, 21, 25 s (8, 16, 24, 32)
    #   slow tau 4: L1..4 -> 25, 33, 41, 49 s (4, 8, 12, 16);       tau 8: 49, 65, 81, 97 s (8, 16, 24, 32)
    # Budgets below 25 s leave the slow group out. T = 25: fast (8, 4) 32 + slow (4, 1) 4 -> 36 / 25 = 1.44;
    # T = 33: 32 + 8 -> 1.21; T = 41: 36 / 41; T = 49: 48 / 49; longer budgets only do worse.
    fast = costs(comm=(1.0, 0.0))
    slow = costs(comm=(1.0, 0.0), slow=4.0)
    plan = plan_groups([fast, slow], group_rounds=1, taus=[4, 8])
    assert plan.groups == [GroupPlan(8, 4, 25.0, 32.0), GroupPlan(4, 1, 25.0, 4.0)]
    assert plan.round_s == 25.0
    assert plan.progress_per_s == pytest.approx(36 / 25)


def test_slow_group_gets_smaller_tau_hand_case():
    # 2 blocks, no comm, H = 1, skew 0. fast step [_, 1, 1.5], slow [_, 4, 6].
    #   fast (tau, L): (1,1) 1 s p1, (1,2) 1.5 p2, (2,1) 2 p2, (2,2) 3 p4, (4,1) 4 p4, (4,2) 6 p8
    #   slow:          (1,1) 4 s p1, (1,2) 6 p2, (2,1) 8 p2, (2,2) 12 p4, (4,1) 16 p4, (4,2) 24 p8
    # T = 4: fast (2,2) p4 (ties with (4,1) at p4: the shorter) + slow (1,1) p1 -> 5/4
    # T = 6: fast (4,2) p8 + slow (1,2) p2 -> 10/6, the best; T = 8: 10/8; T = 12: 12/12; ...
    fast = GroupCosts([0.5, 1.0, 1.5], [0.0] * 3, [0.0, 1.0, 2.0], 10.0, 0.0)
    slow = GroupCosts([2.0, 4.0, 6.0], [0.0] * 3, [0.0, 1.0, 2.0], 10.0, 0.0)
    plan = plan_groups([fast, slow], group_rounds=1, taus=[1, 2, 4])
    assert plan.choices == [(4, 2), (1, 2)]
    assert [g.round_s for g in plan.groups] == [6.0, 6.0]


def test_round_times_equalised_within_candidate_granularity():
    fast, slow = costs(skew=0.05), costs(skew=0.05, slow=4.0)
    taus = [1, 2, 4, 8, 16]
    plan = plan_groups([fast, slow], group_rounds=2, taus=taus)
    (fast_plan, slow_plan) = plan.groups
    assert slow_plan.depth <= fast_plan.depth and slow_plan.tau <= fast_plan.tau
    assert (slow_plan.depth, slow_plan.tau) != (fast_plan.depth, fast_plan.tau)
    # the shorter group's next longer candidate would not fit in the global round
    for group, cost in zip(plan.groups, (fast, slow)):
        times = [fixed_plan([cost], [(t, d)], group_rounds=2).round_s for t in taus for d in range(1, 5)]
        longer = [t for t in times if t > group.round_s]
        assert group.round_s == plan.round_s or min(longer) > plan.round_s
    assert plan.round_s == max(g.round_s for g in plan.groups)


# --- memory --------------------------------------------------------------------------------------------

def test_memory_limit_excludes_deep_depths():
    plan = plan_groups([costs(memory_limit=2.5), costs()], group_rounds=1, taus=[1, 4])
    assert plan.groups[0].depth == 2  # depths 3 and 4 need 3 and 4 bytes
    assert plan.groups[1].depth == 4


def test_no_feasible_depth_names_the_group():
    with pytest.raises(ValueError, match="group 1"):
        plan_groups([costs(), costs(memory_limit=0.5)], group_rounds=1, taus=[1])
    plan = plan_groups([costs(), costs(memory_limit=0.5)], group_rounds=1, taus=[1], min_depth=0)
    assert plan.groups[1].depth == 0  # heads only


# --- skew ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("skew", [0.02, 0.05, 0.1, 0.3, 1.0, 3.0])
def test_more_skewed_group_gets_no_larger_tau(skew):
    plan = plan_groups([costs(skew=0.0), costs(skew=skew)], group_rounds=2, taus=[1, 2, 4, 8, 16])
    assert plan.groups[1].tau <= plan.groups[0].tau


def test_tau_falls_with_skew_for_one_group():
    taus = [plan_groups([costs(skew=s)], group_rounds=1, taus=[1, 2, 4, 8, 16]).groups[0].tau
            for s in (0.0, 0.05, 0.2, 1.0)]
    assert taus == sorted(taus, reverse=True) and taus[0] > taus[-1]


def test_default_progress_values():
    assert default_progress(4, 3, 0.0) == 12.0
    assert default_progress(4, 3, 0.25) == pytest.approx(12.0 / 2.0)
    # peaks at tau = 1 / skew
    assert default_progress(10, 1, 0.1) > max(default_progress(5, 1, 0.1), default_progress(20, 1, 0.1))


def test_custom_progress():
    # progress that ignores tau: more steps only cost time, so every group takes the smallest tau
    plan = plan_groups([costs(), costs(slow=3.0)], group_rounds=1, taus=[2, 1, 8],
                       progress=lambda tau, depth, skew: float(depth))
    assert [g.tau for g in plan.groups] == [1, 1]


# --- re-planning ---------------------------------------------------------------------------------------

def test_replan():
    options = {"group_rounds": 2, "taus": [1, 2, 4, 8, 16]}
    first, changed = replan(None, [costs(), costs(slow=2.0)], **options)
    assert changed and first == plan_groups([costs(), costs(slow=2.0)], **options)

    same, changed = replan(first, [costs(), costs(slow=2.0)], **options)
    assert not changed and same == first

    slower = [costs(), costs(slow=8.0)]
    moved, changed = replan(first, slower, **options)
    assert changed and moved.choices != first.choices

    # hysteresis: a large min_gain keeps the previous choices, re-costed
    kept, changed = replan(first, slower, min_gain=10.0, **options)
    assert not changed and kept.choices == first.choices
    assert kept == fixed_plan(slower, first.choices, group_rounds=2)
    # previous choices that are no longer allowed are replaced whatever min_gain
    narrowed, changed = replan(first, slower, min_gain=10.0, group_rounds=2, taus=[3])
    assert changed and all(g.tau == 3 for g in narrowed.groups)


# --- plans as data, and errors -------------------------------------------------------------------------

def test_fixed_plan_and_as_dict():
    plan = fixed_plan([costs(), costs(slow=2.0)], [(4, 2), (2, 1)], group_rounds=3)
    assert plan.groups[0].round_s == pytest.approx(3 * (4 * 2.0 + 3.0))
    assert plan.groups[1].round_s == pytest.approx(3 * (2 * 3.0 + 2.5))
    assert plan.round_s == plan.groups[0].round_s
    data = json.loads(json.dumps(plan.as_dict()))
    assert data["groups"][1] == {"tau": 2, "depth": 1, "round_s": pytest.approx(25.5), "progress": 2.0}
    assert isinstance(Plan([GroupPlan(1, 1, 2.0)], 2.0).as_dict()["progress_per_s"], float)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"group_rounds": 0, "taus": [1]}, "group_rounds"),
    ({"group_rounds": 1, "taus": []}, "taus"),
    ({"group_rounds": 1, "taus": [0, 1]}, "taus"),
    ({"group_rounds": 1, "taus": [1], "min_depth": 5}, "min_depth"),
    ({"group_rounds": 1, "taus": [1], "progress": lambda t, d, s: -1.0}, "progress"),
])
def test_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_groups([costs()], **kwargs)


def test_bad_costs():
    with pytest.raises(ValueError, match="one entry per depth"):
        GroupCosts([1.0, 2.0], [0.0], [0.0, 0.0], 1.0, 0.0)
    with pytest.raises(ValueError, match="step_s"):
        GroupCosts([0.0, 2.0], [0.0, 0.0], [0.0, 0.0], 1.0, 0.0)
    with pytest.raises(ValueError, match="skew"):
        GroupCosts([1.0, 2.0], [0.0, 0.0], [0.0, 0.0], 1.0, -0.1)
    with pytest.raises(ValueError, match="number of blocks"):
        plan_groups([costs(num_blocks=2), costs(num_blocks=3)], group_rounds=1, taus=[1])
    with pytest.raises(ValueError, match="at least one group"):
        plan_groups([], group_rounds=1, taus=[1])
    with pytest.raises(ValueError, match="one \\(tau, depth\\) per group"):
        fixed_plan([costs()], [(1, 1), (1, 1)], group_rounds=1)
