"""The strategy's guard against absurd updates: a client 1000x the median norm is rejected or clipped.

With FedIT the new ``B`` is the weighted mean of the clients' ``B`` (``A`` stays shared here), so the clipped
client's factors can be read back from the aggregate and its update norm checked densely in float64.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.aggregators import get_aggregator
from fedlora.protocol import ClientReply, TrainSettings
from fedlora.protocol.strategy import RoundStrategy
from fedlora.types import LoRAFactors, ModuleState

CLIENTS = ["a", "b", "c", "d", "wild"]
MODULES = {"q": (9, 7), "v": (6, 8)}
R = 2


def _strategy(bound):
    gen = torch.Generator().manual_seed(11)
    state = {m: ModuleState(LoRAFactors(torch.randn(o, R, generator=gen, dtype=torch.float64) * 0.1,
                                        torch.randn(R, i, generator=gen, dtype=torch.float64) * 0.1, 2.0))
             for m, (o, i) in MODULES.items()}
    return RoundStrategy(get_aggregator("fedit"), state, {}, train=TrainSettings(), ranks={c: R for c in CLIENTS},
                         seed=0, update_bound=bound), gen


def _round(strategy, gen):
    tasks = strategy.configure_train(0, CLIENTS)
    replies = {}
    for i, (cid, task) in enumerate(tasks.items()):
        size = 1000.0 if cid == "wild" else 1.0
        replies[cid] = ClientReply(round=0, client_id=cid, rank=R, num_examples=10 + i, train_loss=0.0, factors={
            m: LoRAFactors(f.B + size * 0.01 * torch.randn(f.B.shape, generator=gen, dtype=torch.float64), f.A,
                           f.scale) for m, f in task.adapter.items()})
    return tasks, replies


def _dense_norm(start: dict[str, LoRAFactors], factors: dict[str, LoRAFactors]) -> float:
    return math.sqrt(sum(float(((factors[m].delta() - start[m].delta()) ** 2).sum()) for m in factors))


def test_an_absurd_update_is_rejected_with_one_line():
    strategy, gen = _strategy((10.0, "reject"))
    tasks, replies = _round(strategy, gen)
    result = strategy.aggregate_train(0, tasks, replies)
    assert result.clients == ["a", "b", "c", "d"]
    why = result.rejected["wild"]
    assert "\n" not in why and "update norm" in why and "10 x the median" in why
    norms = {c: _dense_norm(tasks[c].adapter, replies[c].factors) for c in CLIENTS}
    assert norms["wild"] > 500 * sorted(norms.values())[2]


def test_an_absurd_update_is_clipped_to_the_bound_and_still_counts():
    strategy, gen = _strategy((10.0, "clip"))
    tasks, replies = _round(strategy, gen)
    norms = {c: _dense_norm(tasks[c].adapter, replies[c].factors) for c in CLIENTS}
    bound = 10.0 * sorted(norms.values())[2]  # the median of five
    result = strategy.aggregate_train(0, tasks, replies)
    assert result.clients == CLIENTS and not result.rejected
    assert result.info["clipped"] == {"wild": pytest.approx(norms["wild"], rel=1e-9)}
    # FedIT: new B = sum_k w_k B_k, so the wild client's clipped B is what the others leave over
    w = result.weights
    clipped = {}
    for m, st in result.global_state.items():
        rest = sum(w[c] * replies[c].factors[m].B for c in CLIENTS if c != "wild")
        clipped[m] = LoRAFactors((st.factors.B - rest) / w["wild"], tasks["wild"].adapter[m].A, st.factors.scale)
    assert _dense_norm(tasks["wild"].adapter, clipped) <= bound * (1 + 1e-6)
    assert _dense_norm(tasks["wild"].adapter, clipped) >= bound * (1 - 1e-3)


def test_without_a_bound_the_absurd_update_goes_through():
    strategy, gen = _strategy(None)
    tasks, replies = _round(strategy, gen)
    result = strategy.aggregate_train(0, tasks, replies)
    assert result.clients == CLIENTS and "clipped" not in result.info
