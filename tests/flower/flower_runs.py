"""Checks on a finished Flower run folder, shared by the simulation and deployment tests: its records against
a reference run's, and every process it started gone."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

psutil = pytest.importorskip("psutil")  # the flower extra

KEYS = ("metric", "eval_loss", "agg_error", "agg_error_max", "train_loss", "local_metric")


def run_records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def assert_same_records(flower: list[dict], reference: list[dict], *, same_bytes_through: int | None = None) -> None:
    """Same rounds, clients and metrics; same bytes (through round ``same_bytes_through``; default all).

    After a resume on fresh nodes, the nodes' first tasks carry the catch-up from the base model: more bytes
    down, the same metrics."""
    assert [r["round"] for r in flower] == [r["round"] for r in reference]
    for got, want in zip(flower, reference):
        assert got["clients"] == want["clients"]
        if same_bytes_through is None or got["round"] <= same_bytes_through:
            assert got["bytes_up"] == want["bytes_up"] and got["bytes_down"] == want["bytes_down"]
        for key in KEYS:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-5), (got["round"], key)


def assert_processes_gone(run_dir: Path) -> None:
    pids = json.loads((run_dir / "flower" / "pids.json").read_text())
    assert pids, "the launcher recorded no process"
    for name, pid in pids.items():
        alive = psutil.pid_exists(pid) and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        assert not alive, f"{name} (pid {pid}) still runs"
