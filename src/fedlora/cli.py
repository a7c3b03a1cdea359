"""The ``fedlora`` command line: run, compare, export, methods.

    fedlora run [CONFIG] [key.path=value ...] [--resume DIR]
    fedlora compare --methods fedit,ffa,fedex,fra,hexa [CONFIG] [key.path=value ...] --out DIR
    fedlora export RUN_DIR --out DIR [--merged]
    fedlora methods

Bad input (config, data, model names) ends with one red line naming what is wrong, exit code 2.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markdown import Markdown

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.")
console = Console(stderr=True)


def _stdout() -> Console:
    # Piped output (make, CI logs) would otherwise be cut to 80 columns.
    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def _setup_logging(run_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [RichHandler(console=console, show_path=False, markup=False)]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "run.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True, format="%(message)s")


def _fail(err: Exception) -> None:
    console.print(f"[bold red]error:[/] {str(err).splitlines()[0] if str(err) else type(err).__name__}")
    raise typer.Exit(2)


def _split_args(args: list[str] | None) -> tuple[str | None, list[str]]:
    """The first argument without '=' is the config file; the rest are key.path=value overrides."""
    config, overrides = None, []
    for a in args or []:
        if "=" in a:
            overrides.append(a)
        elif config is None:
            config = a
        else:
            raise typer.BadParameter(f"unexpected argument {a!r} (overrides look like key.path=value)")
    return config, overrides


def _load(args, data_dir: str | None, extra: list[str] = ()):
    from .config import load_config

    config, overrides = _split_args(args)
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    return load_config(config, [*overrides, *extra])


def _run_one(cfg, *, overwrite: bool, stop_after: int | None = None):
    from .checkpoint import latest_round
    from .sim.engine import Simulation

    run_dir = Path(cfg.output_dir)
    if latest_round(run_dir) is not None:
        if not overwrite:
            raise ValueError(f"{run_dir} already holds a run: pass --resume {run_dir} or --overwrite")
        import shutil

        shutil.rmtree(run_dir)
    _setup_logging(run_dir)
    return Simulation(cfg).run(stop_after=stop_after)


@app.command()
def run(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.path=value ...]")] = None,
    resume: Annotated[str | None, typer.Option(help="continue the run in this folder")] = None,
    data_dir: Annotated[str | None, typer.Option(help="offline data folder (default $FEDLORA_DATA_DIR)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in output_dir")] = False,
    stop_after: Annotated[int | None, typer.Option(help="stop after this round (resume later)")] = None,
) -> None:
    """Run one federated experiment (default: MiniLM on SST-2, 8 clients, Dirichlet 0.3, HEXA)."""
    from .report import plot_run, summary_table

    try:
        if resume:
            from .sim.engine import Simulation

            _setup_logging(Path(resume))
            sim = Simulation.resume(resume)
            records, run_dir = sim.run(stop_after=stop_after), sim.run_dir
        else:
            cfg = _load(args, data_dir)
            run_dir = Path(cfg.output_dir)
            records = _run_one(cfg, overwrite=overwrite, stop_after=stop_after)
    except ValueError as err:
        _fail(err)
    plot_run(records, run_dir)
    _stdout().print(summary_table(records, f"fedlora run: {run_dir}"))
    console.print(f"metrics, plots and checkpoints in [bold]{run_dir}[/]")


@app.command()
def compare(
    methods: Annotated[str, typer.Option(help="comma-separated methods, e.g. fedit,ffa,fedex,fra,hexa")],
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.path=value ...]")] = None,
    out: Annotated[str, typer.Option(help="folder for the runs, table and plots")] = "runs/compare",
    data_dir: Annotated[str | None, typer.Option(help="offline data folder")] = None,
) -> None:
    """Run several methods on the same partition and seed; write a markdown table and plots."""
    from .report import compare_markdown, plot_compare

    names = [m.strip() for m in methods.split(",") if m.strip()]
    runs = {}
    try:
        for name in names:
            cfg = _load(args, data_dir, [f"federation.method={name}", f"output_dir={Path(out) / name}"])
            console.rule(f"[bold]{name}")
            runs[name] = _run_one(cfg, overwrite=True)
    except ValueError as err:
        _fail(err)
    table = compare_markdown(runs)
    out_path = Path(out)
    (out_path / "compare.md").write_text(table)
    plot_compare(runs, out_path)
    _stdout().print(Markdown(table))
    console.print(f"table and plots in [bold]{out_path}[/]")


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="a run folder (with checkpoints/)")],
    out: Annotated[str, typer.Option(help="output folder")] = "",
    merged: Annotated[bool, typer.Option(help="write a merged full model instead of an adapter")] = False,
) -> None:
    """Export the newest checkpoint as a stock PEFT adapter (exact, including folded corrections)."""
    from .export import export_run

    try:
        path = export_run(run_dir, out or str(Path(run_dir) / ("merged" if merged else "adapter")), merged=merged)
    except ValueError as err:
        _fail(err)
    console.print(f"wrote [bold]{path}[/]")


@app.command("methods")
def list_methods() -> None:
    """List the aggregation methods."""
    from rich.table import Table

    from .aggregators import AGGREGATORS

    table = Table("method", "exact", "summary")
    for name, cls in sorted(AGGREGATORS.items()):
        doc = (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]
        table.add_row(name, "yes" if cls.exact else "no", doc)
    _stdout().print(table)


def main() -> None:
    import warnings

    # transformers' own deprecation notice, raised from inside PEFT; nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()


if __name__ == "__main__":
    main()
