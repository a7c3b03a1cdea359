"""The in-process engine end to end on a tiny random BERT: resume after SIGKILL, export, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from engine_fixtures import TIMING_KEYS, run_cli, tiny_overrides
from fedlora import checkpoint
from fedlora.config import ConfigError, load_config



def _cfg(assets, out, method="fedex", rounds=4, extra=()):
    model_dir, data = assets
    return load_config(None, [*tiny_overrides(model_dir, data, out, method, rounds), *extra])


def _strip_times(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def _run(cfg):
    from fedlora.sim.engine import Simulation

    sim = Simulation(cfg)
    return sim, sim.run()


KILL_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from engine_fixtures import tiny_overrides
    from fedlora.config import load_config
    from fedlora.sim import engine, runtimes

    cfg = load_config(None, tiny_overrides({model!r}, {data!r}, {out!r}, {method!r}, 4))
    real = runtimes.train_client
    calls = {{"n": 0}}

    def dying(host, task, data):
        if task.round == 2:  # third round, mid-way: the checkpoint of round 2 is on disk
            calls["n"] += 1
            if calls["n"] == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        return real(host, task, data)

    runtimes.train_client = dying
    engine.Simulation(cfg).run()
    """
)


@pytest.mark.parametrize("method", ["fedex", "hexa"])
def test_resume_after_sigkill_matches_uninterrupted_run(assets, tmp_path, method):
    _, full = _run(_cfg(assets, tmp_path / "full", method))

    killed_dir = tmp_path / "killed"
    script = KILL_SCRIPT.format(tests=str(Path(__file__).parent), model=str(assets[0]), data=str(assets[1]),
                                out=str(killed_dir), method=method)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert checkpoint.latest_round(killed_dir)[0] == 2

    from fedlora.sim.engine import Simulation

    resumed = Simulation.resume(killed_dir).run()
    assert len(resumed) == 4
    assert _strip_times(resumed) == _strip_times(full)
    on_disk = [json.loads(line) for line in (killed_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in on_disk] == [1, 2, 3, 4]


def test_kill_while_writing_checkpoint_leaves_previous_round(assets, tmp_path, monkeypatch):
    from fedlora.sim.engine import Simulation

    cfg = _cfg(assets, tmp_path / "run", rounds=3)
    sim = Simulation(cfg)
    sim.run(stop_after=1)
    real_replace = checkpoint.os.replace

    def crash(src, dst):  # die after the round folder is written, before it is renamed into place
        if "round_0002" in str(dst):
            raise KeyboardInterrupt("simulated crash")
        return real_replace(src, dst)

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        sim.run(stop_after=2)
    monkeypatch.undo()
    assert checkpoint.latest_round(tmp_path / "run")[0] == 1
    resumed = Simulation.resume(tmp_path / "run").run()
    assert [r["round"] for r in resumed] == [1, 2, 3]


@pytest.mark.parametrize("method", ["fedex", "hexa"])
def test_exported_adapter_loads_in_stock_peft_with_same_logits(assets, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.export import export_run
    from fedlora.sim.client import batch_at

    sim, _ = _run(_cfg(assets, tmp_path / "run", method, rounds=3))
    assert any(c for c in sim.corrections), "the method should have folded corrections into W"
    idx = torch.arange(sim.data.dev_size).numpy()
    batch = {k: v for k, v in batch_at(sim.data.dev, idx).items() if k != "labels"}
    sim.model.eval()
    with torch.no_grad():
        expected = sim.model(**batch).logits

    out = export_run(tmp_path / "run", tmp_path / "adapter").path
    base = AutoModelForSequenceClassification.from_pretrained(assets[0], num_labels=2)
    loaded = PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        got = loaded(**batch).logits
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    # the exported adapter carries the correction: it is of higher rank than the run's
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["rank_pattern"] and min(config["rank_pattern"].values()) > 4


def test_client_returning_nan_is_rejected_and_logged(assets, tmp_path, monkeypatch, caplog):
    from fedlora.sim import runtimes

    real = runtimes.train_client
    first = {}

    def poisoned(host, task, data):
        reply = real(host, task, data)
        if first.setdefault(task.round, task.client_id) == task.client_id:  # the round's first client
            name = next(iter(reply.factors))
            reply.factors[name].B[0, 0] = float("nan")
        return reply

    monkeypatch.setattr(runtimes, "train_client", poisoned)
    with caplog.at_level("WARNING", logger="fedlora"):
        sim, records = _run(_cfg(assets, tmp_path / "run", rounds=2))
    assert all(len(r["rejected"]) == 1 for r in records)
    assert "rejected update" in caplog.text and "NaN" in caplog.text
    for s in sim.global_state.values():
        assert torch.isfinite(s.factors.B).all() and torch.isfinite(s.factors.A).all()
    # the state on disk is whole and resumable
    assert checkpoint.latest_round(tmp_path / "run")[0] == 2
    state = checkpoint.load_state(checkpoint.round_dir(tmp_path / "run", 2))
    assert [r["round"] for r in state["metrics"]] == [1, 2]


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["federation.rounds=0"], "federation.rounds"),
        (["train.lr=fast"], "train.lr"),
        (["partition.nonsense=1"], "partition.nonsense"),
        (["federation.clients_per_round=99"], "clients_per_round"),
        (["lora.client_ranks=[4, 99]"], "client_ranks"),
    ],
)
def test_bad_config_is_one_line_naming_the_key(overrides, key):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides)
    message = str(err.value)
    assert key in message and "\n" not in message


def test_malformed_yaml_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation: {rounds: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(bad)


def test_missing_data_file_and_wrong_column(assets, tmp_path):
    from fedlora.data import DataError

    with pytest.raises(DataError, match="nope.tsv"):
        _run(_cfg(assets, tmp_path / "a", extra=[f"data.task={tmp_path / 'nope.tsv'}"]))
    with pytest.raises(DataError, match="text"):
        _run(_cfg(assets, tmp_path / "b", extra=["data.text_column=text"]))
    assert checkpoint.latest_round(tmp_path / "b") is None


def test_cli_reports_bad_config_in_one_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("federation:\n  rounds: -1\n")
    proc = run_cli("run", bad)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "federation.rounds" in lines[0], proc.stderr


def test_each_round_records_its_measured_phases_within_its_time(assets, tmp_path):
    from fedlora.runlog import load_metrics

    _, records = _run(_cfg(assets, tmp_path / "run", rounds=2))
    for r in load_metrics(tmp_path / "run"):  # as written to metrics.jsonl
        assert set(r["phase_s"]) == {"exchange", "aggregate", "evaluate"}
        assert all(v > 0 for v in r["phase_s"].values())
        assert sum(r["phase_s"].values()) <= r["round_time_s"]  # parts of the round, measured inside it
    assert len(records) == 2


def test_heterogeneous_ranks_hexa_is_exact_and_base_weights_only_take_the_folds(assets, tmp_path):
    from fedlora import adapters
    from fedlora.sim.engine import Simulation

    cfg = _cfg(assets, tmp_path / "run", "hexa", rounds=2, extra=["lora.client_ranks=[4, 2]"])
    sim = Simulation(cfg)
    before = {m: w.clone().double() for m, w in adapters.base_weights(sim.layers, sim.layers).items()}
    records = sim.run()
    assert all(r["agg_error"] < 1e-5 for r in records)
    # W after = W before + the folded corrections (dense float64 reference); the per-client frozen terms
    # were added for training only and removed exactly.
    after = adapters.base_weights(sim.layers, sim.layers)
    for m, w in after.items():
        expected = before[m].clone()
        for corr in sim.corrections:
            if m in corr:
                expected += corr[m].left.double() @ corr[m].right.double()
        assert torch.allclose(w.double(), expected, atol=1e-6), m
    ranks = {sim.client_ranks[c] for r in records for c in r["clients"]}
    assert ranks == {2, 4}


def test_cli_compare_and_export_on_the_same_partition(assets, tmp_path):
    from typer.testing import CliRunner

    from fedlora.cli import app

    model_dir, data = assets
    overrides = [o for o in tiny_overrides(model_dir, data, tmp_path / "unused", "fedit", 2)
                 if not o.startswith(("federation.method", "output_dir"))]
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["compare", "--methods", "fedit,fedex", "--out", str(out), *overrides])
    assert result.exit_code == 0, result.output
    table = (out / "compare.md").read_text()
    assert "fedit" in table and "fedex" in table
    for png in ("compare_metric.png", "compare_agg_error.png", "compare_bytes.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = {m: [json.loads(x) for x in (out / m / "metrics.jsonl").read_text().splitlines()]
            for m in ("fedit", "fedex")}
    # same seed and partition: the same clients are sampled, FedIT is inexact, FedEx exact
    assert [r["clients"] for r in runs["fedit"]] == [r["clients"] for r in runs["fedex"]]
    assert all(r["agg_error"] > 1e-3 for r in runs["fedit"])
    assert all(r["agg_error"] < 1e-5 for r in runs["fedex"])
    hist = json.loads((out / "fedex" / "label_histograms.json").read_text())
    assert hist == json.loads((out / "fedit" / "label_histograms.json").read_text())

    exported = CliRunner().invoke(app, ["export", str(out / "fedex"), "--out", str(tmp_path / "adapter")])
    assert exported.exit_code == 0, exported.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()


def test_kept_optimizer_state_survives_checkpoint_and_resume(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    extra = ["train.optimizer_state=kept", "partition.num_clients=3"]
    _, full = _run(_cfg(assets, tmp_path / "full", "fedex", rounds=3, extra=extra))
    Simulation(_cfg(assets, tmp_path / "cut", "fedex", rounds=3, extra=extra)).run(stop_after=1)
    resumed = Simulation.resume(tmp_path / "cut")
    assert resumed.optimizer_states, "kept AdamW moments should come back from the checkpoint"
    assert _strip_times(resumed.run()) == _strip_times(full)


def test_core_error_measure_reports_the_exact_errors_and_changes_nothing_else(assets, tmp_path):
    """``federation.error_measure=core`` reaches every aggregation: FRA's per-round error equals the exact
    float64 measurement to 1e-4 relative, and the run (metrics, losses) is the same number for number."""
    _, exact = _run(_cfg(assets, tmp_path / "exact", "fra", rounds=2))
    sim, core = _run(_cfg(assets, tmp_path / "core", "fra", rounds=2, extra=["federation.error_measure=core"]))
    assert sim.strategy.error_measure == "core"
    for a, b in zip(exact, core, strict=True):
        assert a["agg_error"] > 1e-3 and b["agg_error"] == pytest.approx(a["agg_error"], rel=1e-4)
        assert (a["metric"], a["eval_loss"], a["train_loss"]) == (b["metric"], b["eval_loss"], b["train_loss"])
