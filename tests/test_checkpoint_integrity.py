"""Damaged checkpoints: resume and export fall back to the newest intact round; runs extend; verify names damage.

The reference is an uninterrupted run of the same config: a resumed, fallen-back or extended run must
produce the same metric records (every field but times).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from engine_fixtures import TIMING_KEYS, tiny_overrides
from fedlora import checkpoint
from fedlora.config import ConfigError, load_config



def _cfg(assets, out, method="hexa", rounds=3):
    return load_config(None, tiny_overrides(*assets, out, method, rounds))


def _strip(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted 3-round HEXA run: its folder (copied by tests) and its records."""
    from fedlora.sim.engine import Simulation

    out = tmp_path_factory.mktemp("ref") / "run"
    records = Simulation(_cfg(assets, out)).run()
    return out, _strip(records)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


DAMAGE = {"truncated": _truncate, "deleted": Path.unlink, "byte-flipped": _flip}


@pytest.mark.parametrize("how", sorted(DAMAGE))
@pytest.mark.parametrize("stem", ["adapter", "correction"])
def test_resume_falls_back_to_the_previous_intact_round(reference, tmp_path, caplog, how, stem):
    from fedlora.sim.engine import Simulation

    ref_dir, ref_records = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    DAMAGE[how](run / "checkpoints" / "round_0003" / f"{stem}.safetensors")

    checks = {c.number: c for c in checkpoint.verify_run(run)}
    assert checks[1].intact and checks[2].intact and not checks[3].intact
    assert f"{stem}.safetensors" in checks[3].summary()

    with caplog.at_level("WARNING", logger="fedlora"):
        sim = Simulation.resume(run)
    assert sim.next_round == 2
    assert len(sim.skipped) == 1 and "round 3" in sim.skipped[0] and f"{stem}.safetensors" in sim.skipped[0]
    assert "round 3 skipped" in caplog.text
    assert _strip(sim.run()) == ref_records
    assert all(c.intact for c in checkpoint.verify_run(run))
    on_disk = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert _strip(on_disk) == ref_records


def test_a_damaged_earlier_correction_rules_out_every_later_round(reference, tmp_path):
    """Resume replays every fold: a damaged correction of round t rules out rounds t..; of round 1, all."""
    ref_dir, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    _flip(run / "checkpoints" / "round_0002" / "correction.safetensors")
    found = checkpoint.newest_intact_round(run)
    assert found.number == 1
    assert [line.split(":")[0] for line in found.skipped] == ["round 3 skipped", "round 2 skipped"]
    _flip(run / "checkpoints" / "round_0001" / "correction.safetensors")
    with pytest.raises(checkpoint.CheckpointError, match="round_0001/correction.safetensors"):
        checkpoint.newest_intact_round(run)


def test_garbage_json_is_named_and_latest_json_is_only_a_hint(reference, tmp_path):
    ref_dir, _ = reference
    run = tmp_path / "run"
    shutil.copytree(ref_dir, run)
    (run / "checkpoints" / "latest.json").write_text("{not json")
    assert checkpoint.newest_intact_round(run).number == 3  # rounds are found by scanning, then verified
    (run / "checkpoints" / "round_0003" / "state.json").write_bytes(b"\x00garbage")
    found = checkpoint.newest_intact_round(run)
    assert found.number == 2 and "round_0003/state.json" in found.skipped[0]
    with pytest.raises(checkpoint.CheckpointError, match="state.json: not valid JSON"):
        checkpoint.load_state(run / "checkpoints" / "round_0003")


def test_extending_a_finished_run_equals_a_longer_run(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    longer = Simulation(_cfg(assets, tmp_path / "four", rounds=4)).run()
    Simulation(_cfg(assets, tmp_path / "two", rounds=2)).run()
    extended = Simulation.resume(tmp_path / "two", rounds=4)
    assert extended.cfg.federation.rounds == 4
    assert _strip(extended.run()) == _strip(longer)
    state = checkpoint.load_state(checkpoint.round_dir(tmp_path / "two", 4))
    assert state["config"]["federation"]["rounds"] == 4
    with pytest.raises(ConfigError, match="already completed 4 rounds"):
        Simulation.resume(tmp_path / "two", rounds=3)


def test_resume_of_a_missing_folder_creates_nothing(tmp_path):
    from fedlora.sim.engine import Simulation

    with pytest.raises(ValueError, match="no such run folder"):
        Simulation.resume(tmp_path / "nope")
    assert not (tmp_path / "nope").exists()
