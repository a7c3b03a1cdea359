"""The ``fedlora`` command line: run, compare, export; deploy (:mod:`fedlora.cli_flower`); sweep and report
(:mod:`fedlora.cli_results`); verify and methods (:mod:`fedlora.cli_inspect`).

    fedlora run [CONFIG] [key.path=value ...] [--resume DIR] [--engine inprocess|flower]
    fedlora deploy [CONFIG] [key.path=value ...] [--nodes N] [--resume DIR]
    fedlora compare --methods fedit,ffa,fedex,fra,hexa [CONFIG] [key.path=value ...] --out DIR
    fedlora export RUN_DIR --out DIR [--merged] [--rank R]
    fedlora verify RUN_DIR
    fedlora methods
    fedlora sweep SWEEP.yaml [--out DIR]
    fedlora report DIR

Every user error (config, data, model name, method option, a damaged checkpoint) ends with one line on
stderr naming what is wrong, and exit code 2; the library raises ``ValueError`` (or ``OSError`` for files)
and only this module talks to the terminal.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markdown import Markdown
from rich.markup import escape

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated LoRA fine-tuning.",
                  rich_markup_mode="markdown",  # "rich" would read [CONFIG.yaml] as a style tag
                  pretty_exceptions_enable=False)
console = Console(stderr=True)
USER_ERRORS = (ValueError, OSError)


def _stdout() -> Console:
    # Piped output (make, CI logs) would otherwise be cut to 80 columns.
    probe = Console()
    return probe if probe.is_terminal else Console(width=140)


def _setup_logging(run_dir: Path | None = None) -> None:
    if console.is_terminal:
        from rich.logging import RichHandler

        screen: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
    else:  # one line per message in logs and CI: no columns, no wrapping
        screen = logging.StreamHandler(sys.stderr)
        screen.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handlers = [screen]
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(run_dir / "run.log")
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        handlers.append(fh)
    logging.basicConfig(level=logging.INFO, handlers=handlers, force=True, format="%(message)s")


def _error_line(text: str) -> None:
    console.print(f"[bold red]error:[/] {escape(text)}", soft_wrap=True, markup=True, highlight=False)


def _fail(err: Exception) -> None:
    text = str(err).strip()
    _error_line(text.splitlines()[0] if text else type(err).__name__)
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
            raise ValueError(f"unexpected argument {a!r} (overrides look like key.path=value)")
    return config, overrides


def _load(args, data_dir: str | None, extra: list[str] = ()):
    from .config import load_config

    config, overrides = _split_args(args)
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    return load_config(config, [*overrides, *extra])


def _method_specs(methods: str) -> dict[str, list[str]]:
    """``"fedex,hetlora:prune_threshold=0.05"`` -> each method's ``federation.method_options.*`` overrides."""
    specs: dict[str, list[str]] = {}
    for item in (m.strip() for m in methods.split(",")):
        if not item:
            continue
        name, *options = item.split(":")
        if name in specs:
            raise ValueError(f"--methods: a method is listed twice ({methods})")
        bad = [o for o in options if "=" not in o]
        if bad:
            raise ValueError(f"--methods: {name} option {bad[0]!r} is not key=value")
        specs[name] = [f"federation.method_options.{o}" for o in options]
    if not specs:
        raise ValueError("--methods: give at least one method")
    return specs


def _holds_run(run_dir: Path) -> bool:
    from .checkpoint import has_checkpoints
    from .runlog import METRICS_FILE

    return has_checkpoints(run_dir) or (run_dir / METRICS_FILE).exists()


def _claim(run_dir: Path, *, overwrite: bool, hint: str) -> None:
    """Refuse to write over an earlier run unless ``overwrite``; then clear it."""
    if not _holds_run(run_dir):
        return
    if not overwrite:
        raise ValueError(f"{run_dir} already holds a run: {hint}")
    shutil.rmtree(run_dir)


def _resume_rounds(args: list[str] | None, data_dir: str | None) -> int | None:
    """With --resume only ``federation.rounds=N`` may be given: the run's config is fixed."""
    config, overrides = _split_args(args)
    if config is not None:
        raise ValueError(f"--resume takes no config file ({config}): the run's own config is used")
    if data_dir:
        raise ValueError("--data-dir cannot change with --resume: the run's config is fixed")
    rounds = None
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() != "federation.rounds":
            raise ValueError(f"{key}: cannot change with --resume (the run's config is fixed; only "
                             "federation.rounds=N extends it)")
        try:
            rounds = int(value)
        except ValueError:
            raise ValueError(f"federation.rounds: expected a whole number, got {value!r}") from None
        if rounds < 1:
            raise ValueError(f"federation.rounds: must be >= 1, got {rounds}")
    return rounds


class _ProgressBars:
    """Rich progress bars for a run, fed by the engine's ``on_event`` callback (only on a terminal)."""

    def __init__(self, label: str):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bars = Progress(*columns, console=console, disable=not console.is_terminal)
        self.label = label
        self.rounds = self.clients = None

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def __call__(self, kind: str, **info) -> None:
        if kind == "start":
            self.rounds = self.bars.add_task(f"{self.label} rounds", total=info["total"], completed=info["done"])
            self.clients = self.bars.add_task("clients", total=info["clients_per_round"])
        elif kind == "client":
            self.bars.advance(self.clients)
        elif kind == "round":
            self.bars.advance(self.rounds)
            self.bars.reset(self.clients)


def _run_with_progress(sim, stop_after: int | None = None) -> list[dict]:
    with _ProgressBars(sim.method) as bars:
        return sim.run(stop_after=stop_after, on_event=bars)


def _interrupted(run_dir: Path) -> None:
    _error_line(f"interrupted; the last complete round is kept: continue with `fedlora run --resume {run_dir}`")
    raise typer.Exit(130)


@app.command()
def run(
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.path=value ...]")] = None,
    resume: Annotated[str | None, typer.Option(help="continue (or, with federation.rounds=N, extend) this run")] = None,
    data_dir: Annotated[str | None, typer.Option(help="offline data folder (default $FEDLORA_DATA_DIR)")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run in output_dir")] = False,
    stop_after: Annotated[int | None, typer.Option(help="stop after this round (resume later)")] = None,
    engine: Annotated[str, typer.Option(help="inprocess, or flower (Flower's simulation runtime)")] = "inprocess",
) -> None:
    """Run one federated experiment (default: MiniLM on SST-2, 8 clients, Dirichlet 0.3, HEXA)."""
    if engine not in ("inprocess", "flower"):
        _fail(ValueError(f"--engine: expected inprocess or flower, got {engine!r}"))
    if engine == "flower":
        if stop_after is not None:
            _fail(ValueError("--stop-after works with --engine inprocess; on Flower, stop with Ctrl-C and --resume"))
        from .cli_flower import run_flower

        return run_flower(args, resume, data_dir, overwrite)
    run_dir = Path(resume) if resume else None
    try:
        if resume:
            rounds = _resume_rounds(args, data_dir)
            if not run_dir.is_dir():
                raise ValueError(f"{run_dir}: no such run folder to resume")
            from .sim.engine import Simulation  # slow imports (torch, transformers) after the cheap checks

            _setup_logging(run_dir)
            sim = Simulation.resume(run_dir, rounds=rounds)
        else:
            cfg = _load(args, data_dir)
            from .sim.engine import Simulation

            Simulation.check(cfg)  # method options and model name, before anything touches the disk
            run_dir = Path(cfg.output_dir)
            _claim(run_dir, overwrite=overwrite, hint=f"pass --resume {run_dir} or --overwrite")
            _setup_logging(run_dir)
            sim = Simulation(cfg)
        records = _run_with_progress(sim, stop_after)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    from .report import summary_table
    from .report_plots import plot_run

    plot_run(records, run_dir)
    _plot_hierarchy(sim, run_dir)
    _stdout().print(summary_table(records, f"fedlora run: {escape(str(run_dir))}"))
    if sim.cfg.eval.target is not None:
        _stdout().print(Markdown(_targets(records, sim.cfg.eval.target)))
    console.print(f"metrics, plots and checkpoints in [bold]{escape(str(run_dir))}[/]")


def _targets(records, target: float | None) -> str:
    from .report_costs import targets_markdown

    return targets_markdown({"run": records}, target)


def _plot_hierarchy(sim, run_dir: Path) -> None:
    """HierFedLoRA's current groups, with their plan, as ``groups.png``."""
    from .report_costs import plot_groups

    strategy = sim.strategy
    if hasattr(strategy, "grouping"):
        plot_groups(sim.data.histograms, strategy.grouping.groups, strategy.last_plan, run_dir)


@app.command()
def compare(
    methods: Annotated[str, typer.Option(
        help="comma-separated methods, e.g. fedit,ffa,fedex,fra,hexa; options as name:key=value:key=value "
        "(hetlora:prune_threshold=0.05). The config's method_options apply to its own federation.method only")],
    args: Annotated[list[str] | None, typer.Argument(help="[CONFIG.yaml] [key.path=value ...]")] = None,
    out: Annotated[str, typer.Option(help="folder for the runs, table and plots")] = "runs/compare",
    data_dir: Annotated[str | None, typer.Option(help="offline data folder")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace earlier runs of these methods under --out")] = False,
) -> None:
    """Run several methods on the same partition and seed; write a markdown table and plots."""
    out_path = Path(out)
    runs, run_dir = {}, out_path
    try:
        own = _load(args, data_dir).federation.method
        specs = _method_specs(methods)
        configs = {}
        for name, options in specs.items():
            keep = [] if name == own else ["federation.method_options={}"]
            extra = [f"federation.method={name}", *keep, *options, f"output_dir={out_path / name}"]
            configs[name] = _load(args, data_dir, extra)
        from .sim.engine import Simulation

        for cfg in configs.values():  # every method and its options are checked before any training
            Simulation.check(cfg)
        for name, cfg in configs.items():
            if _holds_run(Path(cfg.output_dir)) and not overwrite:
                raise ValueError(f"{cfg.output_dir} already holds a run: pass --overwrite to replace it")
        for name, cfg in configs.items():
            run_dir = Path(cfg.output_dir)
            _claim(run_dir, overwrite=True, hint="")
            _setup_logging(run_dir)
            console.rule(f"[bold]{name}")
            sim = Simulation(cfg)
            runs[name] = _run_with_progress(sim)
            _plot_hierarchy(sim, run_dir)
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        _interrupted(run_dir)
    from .report import compare_markdown
    from .report_plots import plot_compare
    from .report_costs import plot_costs, targets_markdown

    target = next(iter(configs.values())).eval.target
    table = compare_markdown(runs) + "\n" + targets_markdown(runs, target)
    (out_path / "compare.md").write_text(table)
    plot_compare(runs, out_path)
    plot_costs(runs, out_path, target)
    _stdout().print(Markdown(table))
    console.print(f"table and plots in [bold]{escape(str(out_path))}[/]")


@app.command()
def export(
    run_dir: Annotated[str, typer.Argument(help="a run folder (with checkpoints/)")],
    out: Annotated[str, typer.Option(help="output folder")] = "",
    merged: Annotated[bool, typer.Option(help="write a merged full model instead of an adapter")] = False,
    rank: Annotated[int | None, typer.Option(
        help="compact adapter: the best rank-R approximation of the update")] = None,
) -> None:
    """Export the newest intact checkpoint as a stock PEFT adapter (exact, or best rank R with --rank)."""
    from .export import export_run

    try:
        result = export_run(run_dir, out or str(Path(run_dir) / ("merged" if merged else "adapter")),
                            merged=merged, rank=rank)
    except USER_ERRORS as err:
        _fail(err)
    for line in result.skipped:
        console.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True, highlight=False)
    if result.rank is not None:
        console.print(f"rank {result.rank}: relative error {result.rank_error:.3e} of the run's whole update "
                      f"(saved in {result.path / 'rank_error.json'})", soft_wrap=True, highlight=False)
    console.print(f"wrote [bold]{escape(str(result.path))}[/] (round {result.round})")


def main() -> None:
    import warnings

    from . import cli_flower, cli_inspect, cli_results

    cli_flower.register_commands(app)
    cli_results.register_commands(app)
    cli_inspect.register_commands(app)

    import click

    # transformers' own deprecation notice, raised from inside PEFT; nothing a user can act on
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        code = app(standalone_mode=False)
    except click.exceptions.NoArgsIsHelpError as err:
        console.print(escape(err.format_message()))
        code = 0
    except click.exceptions.UsageError as err:  # unknown option, missing argument: one line too
        command = err.ctx.command_path if err.ctx is not None else "fedlora"
        _error_line(f"{err.format_message()} (see `{command} --help`)")
        code = 2
    except click.exceptions.Abort:
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
