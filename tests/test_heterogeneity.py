"""Heterogeneous federations end to end on the tiny BERT: device time, stragglers, HierFedLoRA runs and
resumes, and heterogeneous ranks compared through the real CLI.

References: the time model recomputed by hand from each client's recorded bytes and the FLOP count (itself
checked against PyTorch's counter in test_flops.py), an uninterrupted run (resume), the files the CLI writes.
"""

from __future__ import annotations

import json

import pytest

from engine_fixtures import TIMING_KEYS, run_cli, tiny_overrides
from fedlora.config import load_config

TWO_CLASSES = [
    "devices.classes={fast: {speed: 4.0e+9, up: 1.0e+6, down: 4.0e+6, memory: 8.0e+9},"
    " slow: {speed: 1.0e+9, up: 2.5e+5, down: 1.0e+6, memory: 8.0e+9}}",
    "devices.assignment=[fast, slow]",
]


def _cfg(assets, out, method="fedex", rounds=2, extra=()):
    return load_config(None, [*tiny_overrides(*assets, out, method, rounds), *TWO_CLASSES, *extra])


def test_a_round_lasts_as_long_as_its_slowest_client_by_the_time_model(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    sim = Simulation(_cfg(assets, tmp_path / "run"))
    record = sim.run_round(0)
    cost, clock = sim.clock.cost, sim.clock
    assert {p.name for p in clock.profiles.values()} == {"fast", "slow"}
    want = 0.0
    for cid in record["clients"]:
        p = clock.profiles[cid]
        step = cost.step(8, clock.seq_lens[cid], cost.num_blocks).total
        t = (3 * step / p.speed + record["bytes_down_per_client"][cid] / p.down
             + record["bytes_up_per_client"][cid] / p.up)
        want = max(want, t)
    assert record["sim_round_s"] == pytest.approx(want, rel=1e-12)
    assert any(clock.profiles[c].name == "slow" for c in record["clients"])


def test_a_deadline_drops_the_stragglers_and_the_round_waits_until_it(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    probe = Simulation(_cfg(assets, tmp_path / "probe")).run_round(0)
    sim = Simulation(_cfg(assets, tmp_path / "run", extra=[f"devices.deadline_s={probe['sim_round_s'] / 2}"]))
    record = sim.run_round(0)
    slow = [c for c in record["rejected"] if sim.clock.profiles[c].name == "slow"]
    assert record["stragglers"] == slow and slow
    assert all(sim.clock.profiles[c].name == "fast" for c in record["clients"])
    assert record["sim_round_s"] == pytest.approx(probe["sim_round_s"] / 2)


HIER = ["federation.method_options.groups=2", "federation.method_options.group_rounds=2",
        "federation.method_options.taus=[2, 3]", "federation.clients_per_round=4"]


def test_hierfedlora_runs_logs_its_groups_and_plan_and_resumes_exactly(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    full = Simulation(_cfg(assets, tmp_path / "full", "hierfedlora", rounds=3, extra=HIER)).run()
    assert all(r["sim_round_s"] > 0 and r["agg_error"] < 1e-5 for r in full)
    assert set(full[0]["groups"]) == {"group0", "group1"}
    events = [json.loads(line) for line in (tmp_path / "full" / "hier.jsonl").read_text().splitlines()]
    assert [e["kind"] for e in events][:2] == ["groups", "plan"]
    plan = events[1]["plan"]["groups"]
    assert len(plan) == 2 and all(p["tau"] in (2, 3) and 1 <= p["depth"] <= 2 for p in plan)

    part = Simulation(_cfg(assets, tmp_path / "part", "hierfedlora", rounds=3, extra=HIER))
    part.run(stop_after=1)
    resumed = Simulation.resume(tmp_path / "part").run()

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]

    assert strip(resumed) == strip(full)
    again = [json.loads(line) for line in (tmp_path / "part" / "hier.jsonl").read_text().splitlines()]
    assert again == events


def test_compare_with_heterogeneous_ranks_plots_metric_error_and_rank_energy(assets, tmp_path):
    model_dir, data_file = assets
    out = tmp_path / "cmp"
    overrides = [o for o in tiny_overrides(model_dir, data_file, tmp_path / "x", "hexa", 2)
                 if not o.startswith(("federation.method=", "output_dir="))]
    cmd = ["compare",
           "--methods", "flora,flexlora,hetlora:prune_threshold=0.05:rank_penalty=0.001:penalty_ranks=1,hexa,"
           "hierfedlora:groups=2:taus=[2]",
           "--out", str(out), *overrides, "lora.client_ranks=[1, 2, 4]", *TWO_CLASSES]
    proc = run_cli(*cmd)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("compare_metric.png", "compare_agg_error.png", "compare_rank_energy.png",
                 "compare_metric_vs_time.png", "compare_metric_vs_bytes.png"):
        assert (out / name).stat().st_size > 0, name
    table = (out / "compare.md").read_text()
    assert "Sim. hours to target" in table and "hetlora" in table
    for method in ("flora", "flexlora", "hetlora", "hexa"):
        records = [json.loads(line) for line in (out / method / "metrics.jsonl").read_text().splitlines()]
        assert all(0.0 <= r["rank_energy"] <= 1.0 for r in records), method
        assert all(set(r["client_ranks"].values()) <= {1, 2, 4} for r in records)
    assert (out / "hierfedlora" / "groups.png").stat().st_size > 0  # HierFedLoRA with mixed ranks, drawn
