"""`fedlora deploy` on loopback: a SuperLink with TLS and node authentication, one SuperNode per client.

A SuperNode killed mid-round leaves the round to finish with the others (the log names the lost node) and
the run completes; a SuperLink killed mid-run stops the command with a one-line hint, every process it
started is gone, and ``fedlora deploy --resume`` finishes with the metrics of an uninterrupted run. The
refusal of an unregistered node key and TLS itself are tested at the infrastructure level in
``test_tls_auth.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from engine_fixtures import start_cli
from flower_runs import assert_processes_gone, assert_same_records, run_records

pytestmark = [pytest.mark.deploy]

CLIENTS, PER_ROUND, ROUNDS = 4, 3, 3
EXTRA = ["train.local_steps=40", "flower.round_timeout_s=60", "flower.node_wait_s=60"]


def _overrides(assets, out: Path, method: str = "hexa") -> list[str]:
    from engine_fixtures import tiny_overrides

    model, tsv = assets
    return [*tiny_overrides(model, tsv, out, method, ROUNDS), f"partition.num_clients={CLIENTS}",
            f"federation.clients_per_round={PER_ROUND}", *EXTRA]


def _in_process(assets, out: Path) -> list[dict]:
    from fedlora.config import load_config
    from fedlora.sim.engine import Simulation

    return Simulation(load_config(None, _overrides(assets, out))).run()


def _deploy(*args: str) -> subprocess.Popen:
    return start_cli("deploy", *args)


def _wait_for_round(proc: subprocess.Popen, run_dir: Path, number: int, timeout: float = 300) -> dict:
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"round_{number:04d}").exists():
        if proc.poll() is not None:
            pytest.fail(proc.communicate()[1][-3000:])
        assert time.monotonic() < deadline, "the deployment made no progress"
        time.sleep(0.1)
    return json.loads((run_dir / "flower" / "pids.json").read_text())


def _finish(proc: subprocess.Popen, timeout: float = 400) -> tuple[int, str]:
    try:
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def test_a_supernode_killed_mid_round_leaves_the_round_to_the_others(assets, tmp_path):
    reference = _in_process(assets, tmp_path / "inprocess")
    victim = reference[1]["clients"][0]  # trains in round 2: killed as round 2 starts
    run_dir = tmp_path / "deploy"
    proc = _deploy(*_overrides(assets, run_dir))
    pids = _wait_for_round(proc, run_dir, 1)
    os.kill(pids[f"node{victim}"], signal.SIGKILL)
    code, err = _finish(proc)
    assert code == 0, err[-3000:]
    records = run_records(run_dir)
    assert len(records) == ROUNDS
    assert victim not in records[1]["clients"] and set(records[1]["clients"]) < set(reference[1]["clients"])
    log = (run_dir / "run.log").read_text()
    assert f"(client '{victim}') lost" in log, log[-3000:]
    assert_processes_gone(run_dir)


def test_a_superlink_restart_with_resume_finishes_like_an_uninterrupted_run(assets, tmp_path):
    reference = _in_process(assets, tmp_path / "inprocess")
    run_dir = tmp_path / "deploy"
    proc = _deploy(*_overrides(assets, run_dir))
    pids = _wait_for_round(proc, run_dir, 2)
    os.kill(pids["superlink"], signal.SIGKILL)
    code, err = _finish(proc)
    assert code == 2, err[-3000:]
    assert "Traceback" not in err and f"--resume {run_dir}" in err.strip().splitlines()[-1], err[-3000:]
    assert_processes_gone(run_dir)
    kept = len(run_records(run_dir))
    assert kept < ROUNDS

    code, err = _finish(_deploy("--resume", str(run_dir)))
    assert code == 0, err[-3000:]
    assert_same_records(run_records(run_dir), reference, same_bytes_through=kept)
    assert_processes_gone(run_dir)
