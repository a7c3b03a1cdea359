"""`fedlora run --engine flower` against the in-process engine, through the real CLI and Flower's simulation.

Parity: the same config and seed give the same records on both runtimes (within 1e-5) for FedEx and HEXA
with partial participation (clients sit out rounds and catch up). Resume: the Flower server process is
killed mid-run, the CLI stops every process it started and says how to continue, and ``--resume`` on Flower
finishes with the uninterrupted run's metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine_fixtures import run_cli, start_cli, tiny_overrides
from flower_runs import assert_processes_gone, assert_same_records, run_records

psutil = pytest.importorskip("psutil")
pytestmark = [pytest.mark.flower]
if shutil.which("flower-superlink", path=str(Path(sys.executable).parent)) is None:
    pytest.skip("flower-superlink is not installed (pip install -e .[flower])", allow_module_level=True)

CLIENTS, PER_ROUND, ROUNDS = 5, 2, 4


def _overrides(assets, out: Path, method: str) -> list[str]:
    model, tsv = assets
    return [*tiny_overrides(model, tsv, out, method, ROUNDS),
            f"partition.num_clients={CLIENTS}", f"federation.clients_per_round={PER_ROUND}"]


def _in_process(assets, out: Path, method: str) -> list[dict]:
    from fedlora.config import load_config
    from fedlora.sim.engine import Simulation

    return Simulation(load_config(None, _overrides(assets, out, method))).run()


@pytest.mark.parametrize("method", ["fedex", "hexa"])
def test_flower_simulation_matches_the_in_process_engine(assets, tmp_path, method):
    reference = _in_process(assets, tmp_path / "inprocess", method)
    # partial participation: some client sits out at least one round and trains again later
    seen = [set(r["clients"]) for r in reference]
    assert any(c in seen[i] and c not in seen[i + 1] and any(c in s for s in seen[i + 2:])
               for i in range(len(seen) - 2) for c in seen[i]), "the schedule has no client that catches up"

    run_dir = tmp_path / "flower"
    done = run_cli("run", *_overrides(assets, run_dir, method), "--engine", "flower", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_records(run_records(run_dir), reference)
    assert (run_dir / "checkpoints").is_dir() and (run_dir / "metric.png").exists()
    assert_processes_gone(run_dir)


def _kill_server_after_round(proc: subprocess.Popen, run_dir: Path, round_number: int, timeout: float = 300) -> None:
    """SIGKILL the process running the ServerApp (Flower's simulation process) once a round's checkpoint lands."""
    deadline = time.monotonic() + timeout
    while not (run_dir / "checkpoints" / f"round_{round_number:04d}").exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.2)
    superlink = json.loads((run_dir / "flower" / "pids.json").read_text())["superlink"]
    servers = [p for p in psutil.Process(superlink).children(recursive=True)
               if any("flwr-simulation" in part for part in p.cmdline())]
    assert servers, "no Flower simulation process found"
    for p in servers:
        os.kill(p.pid, signal.SIGKILL)


def test_flower_run_resumes_after_the_server_process_is_killed(assets, tmp_path):
    reference = _in_process(assets, tmp_path / "inprocess", "hexa")
    run_dir = tmp_path / "flower"
    proc = start_cli("run", *_overrides(assets, run_dir, "hexa"), "--engine", "flower")
    try:
        _kill_server_after_round(proc, run_dir, 2)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert "--resume" in last and "Traceback" not in err, err[-3000:]
    assert_processes_gone(run_dir)
    assert len(run_records(run_dir)) < ROUNDS

    kept = len(run_records(run_dir))
    done = run_cli("run", "--resume", str(run_dir), "--engine", "flower", timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_records(run_records(run_dir), reference, same_bytes_through=kept)
    assert_processes_gone(run_dir)
