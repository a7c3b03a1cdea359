"""The ``fedlora`` commands on Flower: ``run --engine flower`` (simulation) and ``deploy`` (TLS on loopback).

    fedlora run [CONFIG] [key.path=value ...] --engine flower [--resume DIR]
    fedlora deploy [CONFIG] [key.path=value ...] [--nodes N] [--resume DIR]

Both write the run folder ``fedlora run`` writes (metrics, plots, checkpoints) and stop every Flower
process they started, also on an error or Ctrl-C. Errors end with one line and exit code 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .cli import (
    USER_ERRORS, _claim, _error_line, _fail, _load, _ProgressBars, _resume_rounds, _setup_logging, _stdout,
    console,
)


def _records(run_dir: Path) -> list[dict]:
    from .runlog import METRICS_FILE

    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _prepare(args, resume: str | None, data_dir: str | None, overwrite: bool):
    """(config, run folder, rounds to extend to) of a new or resumed run, after the cheap checks."""
    from .sim.engine import Simulation

    if resume:
        run_dir = Path(resume)
        rounds = _resume_rounds(args, data_dir)
        if not run_dir.is_dir():
            raise ValueError(f"{run_dir}: no such run folder to resume")
        from .checkpoint import load_state, newest_intact_round
        from .config import config_from_dict

        cfg = config_from_dict(load_state(newest_intact_round(run_dir).folder)["config"])
        if rounds is not None:
            cfg.federation.rounds = rounds
        _setup_logging(run_dir)
        return cfg, run_dir, rounds
    cfg = _load(args, data_dir)
    Simulation.check(cfg)
    run_dir = Path(cfg.output_dir)
    _claim(run_dir, overwrite=overwrite, hint=f"pass --resume {run_dir} or --overwrite")
    _setup_logging(run_dir)
    from .flower.launch import write_run_config

    write_run_config(cfg, run_dir)
    return cfg, run_dir, None


def _finish(cfg, run_dir: Path) -> None:
    from .report import summary_table
    from .report_plots import plot_run

    records = _records(run_dir)
    plot_run(records, run_dir)
    _stdout().print(summary_table(records, f"fedlora on Flower: {escape(str(run_dir))}"))
    console.print(f"metrics, plots and checkpoints in [bold]{escape(str(run_dir))}[/]")


def _launch(kind: str, args, resume, data_dir, overwrite, **options) -> None:
    from .flower import launch

    run_dir = Path(resume) if resume else None
    try:
        cfg, run_dir, rounds = _prepare(args, resume, data_dir, overwrite)
        done = len(_records(run_dir)) if resume else 0
        with _ProgressBars(f"{cfg.federation.method} on Flower") as bars:
            bars("start", total=cfg.federation.rounds, done=done, clients_per_round=cfg.federation.clients_per_round)
            on_record = lambda record: bars("round", record=record)  # noqa: E731
            if kind == "simulation":
                launch.simulate(run_dir, num_nodes=cfg.partition.num_clients, resume=bool(resume), rounds=rounds,
                                on_record=on_record)
            else:
                nodes = options.get("nodes") or cfg.partition.num_clients
                if nodes > cfg.partition.num_clients:
                    raise ValueError(f"--nodes {nodes} exceeds partition.num_clients={cfg.partition.num_clients} "
                                     "(one node per client)")
                data_dir = cfg.data.data_dir or os.environ.get("FEDLORA_DATA_DIR")
                launch.deploy(run_dir, num_nodes=nodes, data_dir=data_dir, resume=bool(resume), rounds=rounds,
                              on_record=on_record)
    except (*USER_ERRORS, RuntimeError) as err:
        text = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if run_dir is not None and any(run_dir.glob("checkpoints/round_*")):
            text += f" (continue with `{_again(kind, run_dir)}`)"
        _fail(ValueError(text))
    except KeyboardInterrupt:
        _error_line(f"interrupted; every Flower process is stopped and the last complete round is kept: "
                    f"continue with `{_again(kind, run_dir)}`")
        raise typer.Exit(130) from None
    _finish(cfg, run_dir)


def _again(kind: str, run_dir: Path | None) -> str:
    return (f"fedlora run --resume {run_dir} --engine flower" if kind == "simulation"
            else f"fedlora deploy --resume {run_dir}")


def run_flower(args, resume: str | None, data_dir: str | None, overwrite: bool) -> None:
    """``fedlora run --engine flower``: the experiment on Flower's simulation runtime (local SuperLink)."""
    _launch("simulation", args, resume, data_dir, overwrite)


def register_commands(app: typer.Typer) -> None:
    """Add ``deploy`` to the ``fedlora`` app (the one running, also under ``python -m fedlora.cli``)."""
    app.command()(deploy)


def deploy(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.path=value ...]")] = None,
    nodes: Annotated[int | None, typer.Option(help="SuperNodes to start (default: partition.num_clients)")] = None,
    resume: Annotated[str | None, typer.Option(help="continue (or extend) this run on a fresh deployment")] = None,
    data_dir: Annotated[str | None, typer.Option(help="offline data folder (default $FEDLORA_DATA_DIR)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in output_dir")] = False,
) -> None:
    """Run the experiment on a real Flower deployment on this machine: a SuperLink with TLS (a throwaway CA)
    and CLI-managed node authentication, one SuperNode per client; every process is stopped at the end."""
    if nodes is not None and nodes < 1:
        _fail(ValueError(f"--nodes: expected a whole number >= 1, got {nodes}"))
    _launch("deploy", args, resume, data_dir, overwrite, nodes=nodes)
