"""fedlora's Flower apps: ``server_app`` runs the engine over a Flower Grid, ``client_app`` trains on a node.

Components of the Flower app that :mod:`fedlora.flower.launch` submits with ``flwr run``
(``fedlora.flower.apps:server_app`` and ``fedlora.flower.apps:client_app``).

Server. :func:`serve` is the engine itself (:class:`~fedlora.sim.engine.Simulation`: sampling, strategy,
aggregation, evaluation, metrics, checkpoints every round in the in-process format) with a
:class:`~fedlora.flower.runtime.FlowerRuntime` in place of the in-process one. The run config (Flower's
``--run-config``) names the run folder (``run-dir``), whose ``flower/config.json`` holds the fedlora config,
and whether to ``resume`` it (optionally to ``rounds``). The server's outcome lands in
``flower/status.json`` (``completed``, or ``failed`` with one line), which the launcher reads.

Client. A node answers the server's query (which partition it holds, its frozen version; the query carries
the run's config, kept in the node's ``context.state``) and trains the tasks it gets through
:class:`~fedlora.flower.node.ClientNode`. Its partition is the node config's ``partition-id``
(Flower's simulation sets it; a deployed SuperNode gets it with ``--node-config``), its data folder the
optional ``data-dir``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid, ServerApp

from .runtime import NODE_RECORD, FlowerRuntime, _one_line, train_handler

log = logging.getLogger("fedlora")

RUN_DIR = "run-dir"
RESUME = "resume"
ROUNDS = "rounds"
CONFIG_FILE = "flower/config.json"
STATUS_FILE = "flower/status.json"

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
    serve(grid, dict(context.run_config))


def serve(grid: Grid, run_config: dict) -> list[dict]:
    """Run (or resume) the experiment of ``run_config["run-dir"]`` over ``grid``; returns its records."""
    from ..config import config_from_dict
    from ..sim.engine import Simulation

    run_dir = Path(str(run_config[RUN_DIR]))
    handler = logging.FileHandler(run_dir / "run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        if run_config.get(RESUME):
            from ..checkpoint import load_state, newest_intact_round

            raw = load_state(newest_intact_round(run_dir).folder)["config"]
        else:
            raw = json.loads((run_dir / CONFIG_FILE).read_text())
        runtime = FlowerRuntime(grid, {}, timeout=raw.get("flower", {}).get("round_timeout_s"))
        if run_config.get(RESUME):
            rounds = int(run_config.get(ROUNDS) or 0) or None
            sim = Simulation.resume(run_dir, rounds=rounds, runtime=lambda host, clients: runtime)
        else:
            cfg = config_from_dict(raw)
            cfg.output_dir = str(run_dir)
            sim = Simulation(cfg, runtime=lambda host, clients: runtime)
        ids = sim.data.client_ids
        config_json = json.dumps(sim.cfg.to_dict(), sort_keys=True)
        missing = runtime.connect(ids, config_json, wait_s=sim.cfg.flower.node_wait_s)
        if len(missing) == len(ids):
            raise RuntimeError(f"no node of the {len(ids)} clients connected within {sim.cfg.flower.node_wait_s:g} s")
        if missing:
            log.warning("no node holds client(s) %s: their tasks fail until one connects", ", ".join(missing))
        records = sim.run()
        write_status(run_dir, "completed")
        return records
    except BaseException as err:
        write_status(run_dir, "failed", _one_line(err) if str(err) else type(err).__name__)
        log.error("the Flower server failed: %s", _one_line(err))
        raise
    finally:
        log.removeHandler(handler)
        handler.close()


def write_status(run_dir: Path, status: str, error: str | None = None) -> None:
    from ..atomic import write_json_atomic

    path = run_dir / STATUS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, {"status": status, "error": error})


# ---------------------------------------------------------------------------- client
@client_app.query()
def _client_query(msg: Message, context: Context) -> Message:
    return answer_query(msg, context)


@client_app.train()
def _client_train(msg: Message, context: Context) -> Message:
    node = _node(context)
    reply = train_handler(node.train)(msg, context)
    state = context.state[NODE_RECORD]
    state["version"], state["frozen"] = node.version, node.save_frozen()
    return reply


def answer_query(msg: Message, context: Context) -> Message:
    """Keep the run's config in the node's state; answer with the node's partition and frozen version."""
    try:
        config_json = str(msg.content[NODE_RECORD]["config"])
        partition = _partition(context)
    except (KeyError, TypeError, ValueError) as err:
        reason = f"fedlora: cannot answer the node query: {_one_line(err)}"
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=msg)
    known = context.state[NODE_RECORD] if NODE_RECORD in context.state else None
    if known is None or known["config"] != config_json:  # a new run: the node starts from the base model
        context.state[NODE_RECORD] = ConfigRecord({"config": config_json, "version": 0, "frozen": b""})
    version = int(context.state[NODE_RECORD]["version"])
    return Message(RecordDict({NODE_RECORD: ConfigRecord({"partition": partition, "version": version})}),
                   reply_to=msg)


def _partition(context: Context) -> int:
    value = context.node_config.get("partition-id")
    if value is None or isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError(f"node config partition-id must be a whole number, got {value!r}")
    return int(value)


def _node(context: Context):
    if NODE_RECORD not in context.state:
        raise RuntimeError("this node got a task before the server's query (it holds no run config)")
    from .node import node_for  # torch models and data: only where a task is trained, not for a query

    state = context.state[NODE_RECORD]
    config_json = str(state["config"])
    data_dir = context.node_config.get("data-dir")
    node = node_for(config_json, _partition(context), str(data_dir) if data_dir else None)
    version = int(state["version"])
    if node.version != version:  # a fresh process (or one that lost a step): rebuild from the node's state
        node.restore_frozen(bytes(state["frozen"]), version)
    return node
