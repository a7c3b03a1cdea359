"""The learning rate across rounds: hand-computed rates, the tasks every runtime receives, and a real run.

References: the schedules' values written out by hand for four rounds (``lr = 0.01``); the rate each client
received, read from a spy on local training in a tiny engine run.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from fedlora.aggregators import get_aggregator
from fedlora.protocol import TrainSettings, round_lr
from fedlora.protocol.strategy import RoundStrategy
from fedlora.types import LoRAFactors, ModuleState

LR = 0.01
BY_HAND = {  # rounds 1..4 of 4
    "constant": [0.01, 0.01, 0.01, 0.01],
    "linear": [0.01, 0.0075, 0.005, 0.0025],
    "cosine": [0.01, 0.005 * (1 + math.sqrt(0.5)), 0.005, 0.005 * (1 - math.sqrt(0.5))],
}


@pytest.mark.parametrize("schedule", list(BY_HAND))
def test_round_lr_matches_the_rates_written_by_hand(schedule):
    assert [round_lr(LR, schedule, t, 4) for t in range(4)] == pytest.approx(BY_HAND[schedule], rel=1e-12)


@pytest.mark.parametrize("args, words", [
    (("step", 0, 4), "lr schedule must be one of constant, linear, cosine"),
    (("linear", 4, 4), "outside the run's 4 rounds"),
    (("linear", -1, 4), "outside the run's 4 rounds"),
])
def test_round_lr_rejects_unknown_schedules_and_rounds_outside_the_run(args, words):
    with pytest.raises(ValueError, match=words):
        round_lr(LR, *args)


def _strategy(**kwargs):
    gen = torch.Generator().manual_seed(3)
    state = {"q": ModuleState(LoRAFactors(torch.randn(4, 2, generator=gen), torch.randn(2, 5, generator=gen), 2.0))}
    return RoundStrategy(get_aggregator("fedit"), state, {}, train=TrainSettings(lr=LR, warmup_steps=2),
                         ranks={"a": 2, "b": 2}, seed=0, **kwargs)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_every_task_of_a_round_carries_that_rounds_rate_and_nothing_else_changes(schedule):
    strategy = _strategy(lr_schedule=schedule, rounds=4)
    for t in range(4):
        tasks = strategy.configure_train(t, ["a", "b"])
        assert [task.train.lr for task in tasks.values()] == pytest.approx([BY_HAND[schedule][t]] * 2, rel=1e-12)
        assert all(task.train.warmup_steps == 2 for task in tasks.values())


def test_a_schedule_without_the_number_of_rounds_is_refused():
    with pytest.raises(ValueError, match="needs the run's number of rounds"):
        _strategy(lr_schedule="linear")


def test_a_run_trains_each_round_at_its_scheduled_rate(assets, tmp_path, monkeypatch):
    """The rate reaches local training (a spy on ``train_local``) and the round's record."""
    from engine_fixtures import tiny_overrides
    from fedlora.config import load_config
    from fedlora.sim import client
    from fedlora.sim.engine import Simulation

    seen = []
    real = client.train_local

    def spy(*args, lr, **kwargs):
        seen.append(lr)
        return real(*args, lr=lr, **kwargs)

    monkeypatch.setattr(client, "train_local", spy)
    model_dir, data = assets
    cfg = load_config(None, [*tiny_overrides(model_dir, data, tmp_path, "fedit", 4), "train.lr_schedule=linear"])
    Simulation(cfg).run()
    per_round = [seen[3 * t:3 * t + 3] for t in range(4)]  # 3 clients a round
    assert per_round == [[pytest.approx(r, rel=1e-12)] * 3 for r in BY_HAND["linear"]]
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr"] for r in records] == pytest.approx(BY_HAND["linear"], rel=1e-12)


def test_a_scheduled_run_cannot_be_extended_and_says_so_in_one_line(assets, tmp_path):
    """The rates of its finished rounds were set by its own number of rounds; the CLI exits 2, no traceback."""
    from engine_fixtures import run_cli, tiny_overrides
    from fedlora.config import load_config
    from fedlora.sim.engine import Simulation

    model_dir, data = assets
    Simulation(load_config(None, [*tiny_overrides(model_dir, data, tmp_path, "fedit", 2),
                                  "train.lr_schedule=cosine"])).run()
    done = run_cli("run", "--resume", tmp_path, "federation.rounds=4")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "train.lr_schedule=cosine" in lines[0] and "cannot be extended" in lines[0]
    assert not (tmp_path / "checkpoints" / "round_0003").exists()
