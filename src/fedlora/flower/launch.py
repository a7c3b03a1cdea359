"""Run a fedlora experiment on Flower: in simulation on a local SuperLink, or as a TLS deployment on loopback.

Both write the run folder of the in-process engine (metrics, plots, checkpoints) from fedlora's ServerApp
(:mod:`fedlora.flower.apps`), and both stop every process they started, by PID, whatever happens
(:class:`~fedlora.flower.deploy.Processes`). Layout under ``RUN_DIR/flower/``:

* ``config.json``: the run's config for the ServerApp (data folder resolved); ``status.json``: its outcome;
* ``app/pyproject.toml``: the Flower app ``flwr run`` submits (components in :mod:`fedlora.flower.apps`);
* ``home/``: ``FLWR_HOME`` of the CLI (connection ``fedlora``); ``pids.json``: the processes started;
* ``superlink.log``, ``<node>.log``; for a deployment also ``certs/`` (a throwaway CA) and ``keys/``.

:func:`simulate` runs Flower's simulation runtime (one simulated SuperNode per client; Flower sets each
node's ``partition-id``). :func:`deploy` starts a SuperLink with TLS and CLI-managed SuperNode
authentication, registers one key per node, and starts one SuperNode per client with its partition and
data folder in its node config. Either one resumes a run whose server died: the ServerApp restarts from
the newest intact checkpoint, and nodes that lost their state are caught up from the base model.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from ..runlog import METRICS_FILE
from . import deploy as dp
from .apps import CONFIG_FILE, RESUME, ROUNDS, RUN_DIR, STATUS_FILE

log = logging.getLogger("fedlora")

CONNECTION = "fedlora"
APP_PYPROJECT = """[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "fedlora-run"
version = "1.0.0"
description = "A fedlora experiment on Flower (components in the installed fedlora package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "fedlora"

[tool.flwr.app.components]
serverapp = "fedlora.flower.apps:server_app"
clientapp = "fedlora.flower.apps:client_app"

[tool.flwr.app.config]  # set per run by `flwr run --run-config`
run-dir = ""
resume = false
rounds = 0
"""


_SERVER_PROCESSES = ("flwr-simulation", "flwr-serverapp")  # what runs fedlora's ServerApp


class FlowerRunError(RuntimeError):
    """The Flower run did not complete (one line; the run folder keeps every complete round)."""


def write_run_config(cfg, run_dir: Path) -> Path:
    """The config the ServerApp reads, with the data folder resolved here (nodes may not share our env)."""
    raw = cfg.to_dict()
    raw["output_dir"] = str(run_dir)
    data_dir = raw["data"].get("data_dir") or os.environ.get("FEDLORA_DATA_DIR")
    if data_dir:
        raw["data"]["data_dir"] = str(Path(data_dir).resolve())
    path = run_dir / CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw, indent=1))
    return path


def simulate(run_dir: Path, *, num_nodes: int, resume: bool = False, rounds: int | None = None,
             on_record: Callable[[dict], None] | None = None, timeout: float | None = None) -> None:
    """Run (or resume) the experiment of ``run_dir`` on Flower's simulation runtime; returns when it completes.

    ``write_run_config`` must have written its config (a new run). ``on_record(record)`` hears each round's
    metrics record as it lands. Raises :class:`FlowerRunError` if the run does not complete.
    """
    folder = _prepare(run_dir)
    with dp.Processes() as procs:
        address = dp.start_superlink(procs, folder, dp.free_port(), simulation=True, home=folder / "home")
        home = dp.write_flower_home(folder / "home", CONNECTION, address)
        _write_pids(folder, procs)
        _submit_and_wait(run_dir, home, procs, resume, rounds, on_record, timeout,
                         federation_config={"num-supernodes": num_nodes})


def deploy(run_dir: Path, *, num_nodes: int, data_dir: str | None = None, resume: bool = False,
           rounds: int | None = None, on_record: Callable[[dict], None] | None = None,
           timeout: float | None = None, on_started: Callable[[dict], None] | None = None) -> None:
    """Run (or resume) the experiment of ``run_dir`` on a real Flower deployment on loopback.

    A throwaway CA signs the SuperLink's certificate; each of the ``num_nodes`` SuperNodes gets its own key
    pair, registered with the Flower CLI before it starts (only registered keys are accepted), and node
    ``i`` holds partition ``i`` with its data in ``data_dir``. ``on_started(pids)`` hears the PIDs once
    everything runs (tests use it to kill a node or the SuperLink).
    """
    folder = _prepare(run_dir)
    certs = dp.make_certificates(folder / "certs")
    with dp.Processes() as procs:
        address = dp.start_superlink(procs, folder, dp.free_port(), certificates=certs, supernode_auth=True,
                                     database=folder / "superlink.db", home=folder / "home")
        home = dp.write_flower_home(folder / "home", CONNECTION, address, root_certificates=certs.ca_cert)
        for i in range(num_nodes):
            keys = dp.make_node_keys(folder / "keys", f"node{i}")
            dp.register_node(home, CONNECTION, keys.public_key)
            node_config = {"partition-id": i, "num-partitions": num_nodes}
            if data_dir:
                node_config["data-dir"] = str(Path(data_dir).resolve())
            dp.start_supernode(procs, folder, f"node{i}", address, node_config=node_config, certificates=certs,
                               keys=keys, port=dp.free_port(), home=folder / f"node{i}-home")
        pids = _write_pids(folder, procs)
        if on_started is not None:
            on_started(pids)
        _submit_and_wait(run_dir, home, procs, resume, rounds, on_record, timeout)


def _prepare(run_dir: Path) -> Path:
    folder = run_dir / "flower"
    (folder / "app").mkdir(parents=True, exist_ok=True)
    (folder / "app" / "pyproject.toml").write_text(APP_PYPROJECT)
    (run_dir / STATUS_FILE).unlink(missing_ok=True)
    return folder


def _write_pids(folder: Path, procs: dp.Processes) -> dict:
    pids = dict(procs.pids)
    (folder / "pids.json").write_text(json.dumps(pids))
    return pids


def _submit_and_wait(run_dir: Path, home: Path, procs: dp.Processes, resume: bool, rounds: int | None,
                     on_record: Callable[[dict], None] | None, timeout: float | None,
                     federation_config: dict | None = None) -> None:
    run_config = {RUN_DIR: str(run_dir.resolve()), RESUME: bool(resume), ROUNDS: int(rounds or 0)}
    run_id = dp.submit_run(home, run_dir / "flower" / "app", CONNECTION, run_config=run_config,
                           federation_config=federation_config)
    log.info("Flower run %s started", run_id)
    status_file, metrics = run_dir / STATUS_FILE, run_dir / METRICS_FILE
    seen = _line_count(metrics)
    deadline = None if timeout is None else time.monotonic() + timeout
    server_seen = server_gone_at = None
    last_check = time.monotonic()
    while True:
        seen = _emit_new(metrics, seen, on_record)
        if status_file.exists():
            status = json.loads(status_file.read_text())
            _emit_new(metrics, seen, on_record)
            if status.get("status") == "completed":
                _save_flower_view(home, run_id, run_dir / "flower" / "run.json")
                return
            raise FlowerRunError(f"the Flower server failed: {status.get('error')}")
        if not procs.alive("superlink"):
            raise FlowerRunError("the SuperLink stopped before the run completed "
                                 f"(log: {run_dir}/flower/superlink.log)")
        # The ServerApp's process (Flower's simulation, or flwr-serverapp): gone without an outcome = died.
        running = any(procs.descendants_running(m) for m in _SERVER_PROCESSES)
        server_seen = server_seen or running
        if server_seen and not running:
            server_gone_at = server_gone_at or time.monotonic()
            if time.monotonic() - server_gone_at > 3.0:  # the status file lands just before it exits
                raise FlowerRunError(f"the Flower server process ended before the run completed; see {run_dir}/run.log")
        if not running and time.monotonic() - last_check > 10:  # e.g. a ServerApp that never started
            last_check = time.monotonic()
            state = dp.run_status(home, CONNECTION, run_id)
            if state.startswith("finished") and not status_file.exists():
                raise FlowerRunError(f"the Flower run ended ({state}) without the server's outcome; see "
                                     f"{run_dir}/flower/superlink.log")
        if deadline is not None and time.monotonic() > deadline:
            raise FlowerRunError(f"the Flower run did not complete within {timeout:g} s")
        time.sleep(0.25)


def _save_flower_view(home: Path, run_id: int, path: Path) -> None:
    """Flower's own record of the run (status, times, network traffic), when it can be had."""
    for _ in range(20):  # the run turns "finished" just after the ServerApp returns
        try:
            runs = dp._flwr(home, "ls", CONNECTION, "--run-id", str(run_id)).get("runs", [])
        except dp.DeployError:
            return
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            path.write_text(json.dumps(runs[0], indent=1))
            return
        time.sleep(0.5)


def _line_count(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def _emit_new(metrics: Path, seen: int, on_record: Callable[[dict], None] | None) -> int:
    """Hand ``on_record`` the complete lines after the first ``seen``; returns the new count."""
    if not metrics.exists():
        return seen
    text = metrics.read_text()
    lines = text[: text.rfind("\n") + 1].splitlines()  # a line still being written waits for its newline
    for line in lines[min(seen, len(lines)):]:
        if on_record is not None and line.strip():
            on_record(json.loads(line))
    return len(lines)
