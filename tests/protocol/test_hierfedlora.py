"""HierFedLoRA's two-level round, driven with hand-made replies (no model).

References: hand-computed factor averages (FedIT at both levels: each module over exactly the groups that
trained it) and a dense float64 model folded step by step (FedEx at both levels: exact), plus HEXA's
heterogeneous-rank payloads checked against the dense global model.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from fedlora.aggregators import get_aggregator
from fedlora.protocol import ClientReply, CorrectionHistory, TrainSettings
from fedlora.protocol.hierfedlora import HierFedLoRA, HierOptions
from fedlora.protocol.strategy import RoundStrategy
from fedlora.types import LoRAFactors, ModuleState

MODULES = {"block0.q": 0, "block1.q": 1}  # module -> block (1 = top)
SHAPE = (3, 5)
RANK = 2
SCALE = 2.0


@dataclass
class _Grouping:
    groups: list[list[str]]

    def group_of(self, cid):
        return next(g for g, members in enumerate(self.groups) if cid in members)


@dataclass
class _GroupPlan:
    tau: int
    depth: int


@dataclass
class _Plan:
    groups: list[_GroupPlan]

    def as_dict(self):
        return {"groups": [{"tau": p.tau, "depth": p.depth} for p in self.groups]}


def _factors(gen, rank=RANK):
    return LoRAFactors(torch.randn(SHAPE[0], rank, generator=gen, dtype=torch.float64),
                       torch.randn(rank, SHAPE[1], generator=gen, dtype=torch.float64), SCALE * RANK / rank)


def _strategy(rule, global_rule, groups, depths, group_rounds, seed=0, rule_options=None, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    state = {m: ModuleState(_factors(gen)) for m in MODULES}
    by_depth = {d: [m for m, b in MODULES.items() if b >= len(MODULES) - d] for d in range(len(MODULES) + 1)}
    ranks = {c: RANK for g in groups for c in g}
    return HierFedLoRA(
        get_aggregator(rule, **(rule_options or {})), get_aggregator(global_rule), state, {},
        grouping=_Grouping(groups), plan_for=lambda grouping: _Plan([_GroupPlan(3, d) for d in depths]),
        modules_at_depth=lambda d: list(by_depth[d]), group_rounds=group_rounds,
        train=TrainSettings(), ranks=ranks, seed=seed, history=CorrectionHistory(), **kwargs,
    )


def _reply(task, gen, examples):
    """A client's trained adapter: a random one of the task's rank, for the task's modules only."""
    return ClientReply(round=task.round, client_id=task.client_id, rank=task.rank,
                       factors={m: _factors(gen, task.rank) for m in task.modules},
                       num_examples=examples[task.client_id], train_loss=0.5)


def _dense(f: LoRAFactors) -> torch.Tensor:
    return f.scale * f.B @ f.A


EXAMPLES = {"a": 10, "b": 30, "c": 20, "d": 40}


def test_global_step_averages_each_module_over_exactly_the_groups_that_trained_it():
    # group 0 (a, b) trains both blocks; group 1 (c) only the top one. FedIT at both levels.
    strategy = _strategy("fedit", "fedit", [["a", "b"], ["c"]], depths=[2, 1], group_rounds=1)
    gen = torch.Generator().manual_seed(7)
    tasks = strategy.configure_train(0, ["a", "b", "c"], step=0)
    assert tasks["c"].modules == ["block1.q"] and sorted(tasks["a"].modules) == sorted(MODULES)
    assert all(t.train.local_steps == 3 for t in tasks.values())
    replies = {cid: _reply(t, gen, EXAMPLES) for cid, t in tasks.items()}
    start = {m: s.factors for m, s in strategy.global_state.items()}
    result = strategy.aggregate_train(0, tasks, replies, step=0)

    f = {cid: r.factors for cid, r in replies.items()}
    group0 = {m: (0.25 * f["a"][m].B + 0.75 * f["b"][m].B, 0.25 * f["a"][m].A + 0.75 * f["b"][m].A) for m in MODULES}
    group1 = {"block1.q": (f["c"]["block1.q"].B, f["c"]["block1.q"].A)}
    # the top module: both groups, weighted by their examples (40 and 20)
    want_top = [2 / 3 * group0["block1.q"][i] + 1 / 3 * group1["block1.q"][i] for i in range(2)]
    got = result.global_state["block1.q"].factors
    torch.testing.assert_close(got.B, want_top[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got.A, want_top[1], rtol=1e-12, atol=1e-12)
    # the bottom module: group 0 alone (group 1 never trained it, so it does not pull it back to the start)
    got = result.global_state["block0.q"].factors
    torch.testing.assert_close(got.B, group0["block0.q"][0], rtol=1e-12, atol=1e-12)
    assert not torch.allclose(got.B, start["block0.q"].B)
    assert result.weights == pytest.approx({"group0": 2 / 3, "group1": 1 / 3})


@pytest.mark.parametrize("rule, options", [("fedex", {}), ("hexa", {"beta": 0.0}), ("fra", {"fold_tail": True})])
def test_exact_rules_at_both_levels_give_the_groups_weighted_dense_models(rule, options):
    # Two group rounds: members of round 2 start exactly from their group's model; the global model after
    # the round is sum_g q_g (group model), per module over the groups that trained it. (HEXA's divergence
    # weights are off so that the reference's data weights are its weights.)
    strategy = _strategy(rule, "fedex", [["a", "b"], ["c", "d"]], depths=[2, 1], group_rounds=2,
                         rule_options=options)
    gen = torch.Generator().manual_seed(3)
    start = {m: _dense(s.factors) for m, s in strategy.global_state.items()}
    group_model = {g: dict(start) for g in (0, 1)}
    members = {0: ["a", "b"], 1: ["c", "d"]}
    for step in range(2):
        tasks = strategy.configure_train(0, ["a", "b", "c", "d"], step=step)
        for g, cids in members.items():
            for cid in cids:
                t = tasks[cid]
                for m in t.modules:  # every member starts from exactly its group's model
                    have = _dense(t.adapter[m]) + (t.frozen[m].left @ t.frozen[m].right if m in t.frozen else 0)
                    torch.testing.assert_close(have, group_model[g][m], rtol=1e-10, atol=1e-10)
        replies = {cid: _reply(t, gen, EXAMPLES) for cid, t in tasks.items()}
        for g, cids in members.items():
            n = sum(EXAMPLES[c] for c in cids)
            for m in tasks[cids[0]].modules:
                frozen = tasks[cids[0]].frozen.get(m)
                extra = frozen.left @ frozen.right if frozen is not None else 0
                group_model[g][m] = sum(EXAMPLES[c] / n * _dense(replies[c].factors[m]) for c in cids) + extra
        result = strategy.aggregate_train(0, tasks, replies, step=step)
    assert result.error < 1e-9
    folded = {m: result.corrections[m].left @ result.corrections[m].right for m in result.corrections}
    q = {0: 40 / 100, 1: 60 / 100}
    for m, block in MODULES.items():
        groups = [0, 1] if block == 1 else [0]
        total = sum(q[g] for g in groups)
        want = sum(q[g] / total * group_model[g][m] for g in groups)
        have = _dense(result.global_state[m].factors) + folded.get(m, 0)
        torch.testing.assert_close(have, want, rtol=1e-9, atol=1e-9)
    assert strategy.history.latest == 1


def test_hexa_with_heterogeneous_ranks_starts_every_client_from_exactly_the_global_model():
    gen = torch.Generator().manual_seed(11)
    state = {m: ModuleState(_factors(gen, 4)) for m in MODULES}
    ranks = {"r1": 1, "r2": 2, "r4": 4}
    strategy = RoundStrategy(get_aggregator("hexa"), state, {}, train=TrainSettings(), ranks=ranks, seed=0)
    tasks = strategy.configure_train(0, list(ranks))
    for cid, t in tasks.items():
        assert t.rank == ranks[cid]
        for m, s in state.items():
            have = _dense(t.adapter[m]) + (t.frozen[m].left @ t.frozen[m].right if m in t.frozen else 0)
            torch.testing.assert_close(have, _dense(s.factors), rtol=1e-12, atol=1e-12)
            assert (m in t.frozen) == (ranks[cid] < 4)


def test_options_are_checked_in_one_line():
    with pytest.raises(ValueError, match="hierfedlora: taus"):
        HierOptions(taus=[])
    with pytest.raises(ValueError, match="hierfedlora: rule: unknown aggregation method 'nope'"):
        HierOptions(rule="nope").rules(0)
    rule, global_rule = HierOptions(rule="hexa", global_rule="fedit").rules(0)
    assert (rule.name, global_rule.name) == ("hexa", "fedit")


def test_a_new_grouping_is_adopted_and_logged_once():
    strategy = _strategy("fedex", "fedex", [["a", "b"], ["c"]], depths=[2, 1], group_rounds=1)
    strategy.configure_train(0, ["a", "b", "c"])
    assert [e["kind"] for e in strategy.events] == ["groups", "plan"]
    strategy.regroup(_Grouping([["a", "b"], ["c"]]), 1)  # the same groups: nothing new
    strategy.regroup(_Grouping([["a"], ["b", "c"]]), 1)
    assert strategy.events[-1] == {"round": 2, "kind": "groups", "groups": [["a"], ["b", "c"]]}
    assert len(strategy.events) == 3 and strategy.lane_of("b") == 1


def test_every_group_exchange_of_a_round_trains_at_that_rounds_scheduled_rate():
    """A cosine schedule over 2 rounds: 1 x the rate in round 1, (1 + cos(pi/2)) / 2 = 0.5 x in round 2."""
    strategy = _strategy("fedit", "fedit", [["a", "b"], ["c"]], [2, 1], group_rounds=2,
                         lr_schedule="cosine", rounds=2)
    lr = TrainSettings().lr
    for round_idx, factor in ((0, 1.0), (1, 0.5)):
        for step in range(2):
            tasks = strategy.configure_train(round_idx, ["a", "b", "c"], step=step)
            assert [t.train.lr for t in tasks.values()] == pytest.approx([factor * lr] * 3, rel=1e-12)
            assert [t.train.local_steps for t in tasks.values()] == [3, 3, 3]
