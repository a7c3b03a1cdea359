"""``fedlora sweep`` and ``fedlora report``: many runs, one progress view, one report.

    fedlora sweep SWEEP.yaml [--out DIR] [--data-dir DIR] [--dry-run]
    fedlora report DIR [--out DIR]

A sweep skips finished cells, resumes a killed cell from its checkpoint and starts the others; it checks
every cell's config before training any. Errors end in one line and exit 2, as everywhere in the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from .cli import USER_ERRORS, _error_line, _fail, _setup_logging, _stdout, console


def register_commands(app: typer.Typer) -> None:
    app.command()(sweep)
    app.command()(report)


class _SweepProgress:
    """One view for the sweep: cells done, and the rounds of the cell running now."""

    def __init__(self, total: int, done: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bars = Progress(*columns, console=console, disable=not console.is_terminal)
        self.cells = self.bars.add_task("sweep cells", total=total, completed=done)
        self.rounds = self.bars.add_task("rounds", total=1, visible=False)

    def __enter__(self):
        self.bars.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bars.__exit__(*exc)

    def start_cell(self, name: str) -> None:
        self.bars.update(self.rounds, description=f"  {name}", visible=True, completed=0)

    def __call__(self, kind: str, **info) -> None:  # the engine's on_event
        if kind == "start":
            self.bars.update(self.rounds, total=info["total"], completed=info["done"])
        elif kind == "round":
            self.bars.advance(self.rounds)

    def cell_done(self) -> None:
        self.bars.advance(self.cells)


def sweep(
    spec_file: Annotated[str, typer.Argument(help="the sweep file (YAML: config, overrides, methods, partitions, "
                                             "seeds, ranks, lrs, out)")],
    out: Annotated[str | None, typer.Option(help="sweep folder (default: the file's out)")] = None,
    data_dir: Annotated[str | None, typer.Option(help="offline data folder (default $FEDLORA_DATA_DIR)")] = None,
    dry_run: Annotated[bool, typer.Option(help="check every cell and write sweep.json; train nothing")] = False,
) -> None:
    """Run methods x partitions x seeds (x ranks, x lrs): resumable, then write the report."""
    from . import sweep as sw

    cell = None
    try:
        spec = sw.load_sweep(spec_file, out)
        cells = sw.plan_cells(spec, data_dir)
        from .sim.engine import Simulation

        configs = {c.name: sw.cell_config(spec, c) for c in cells}
        for cfg in configs.values():  # every cell's method, options and model, before any training
            Simulation.check(cfg)
        status = {c.name: sw.cell_status(c, configs[c.name].federation.rounds) for c in cells}
        sw.write_manifest(spec, cells, status)
        runs = {c.dir: c for c in cells}  # a centralized run serves every partition: run it once
        todo = [c for d, c in runs.items() if status[c.name] != "done"]
        console.print(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} done, {len(todo)} to run) in {spec.out}")
        if dry_run:
            return
        with _SweepProgress(len(runs), len(runs) - len(todo)) as view:
            for cell in todo:
                cfg = configs[cell.name]
                _setup_logging(cell.dir)
                view.start_cell(cell.name)
                if status[cell.name] == "partial":
                    sim = Simulation.resume(cell.dir)
                else:
                    if cell.dir.exists():  # a cell killed before its first checkpoint: start it again
                        import shutil

                        shutil.rmtree(cell.dir)
                    sim = Simulation(cfg)
                sim.run(on_event=view)
                for c in cells:
                    if c.dir == cell.dir:
                        status[c.name] = "done"
                sw.write_manifest(spec, cells, status)
                view.cell_done()
    except USER_ERRORS as err:
        _fail(err)
    except KeyboardInterrupt:
        where = f" (cell {cell.name})" if cell is not None else ""
        _error_line(f"interrupted{where}; finished cells are kept: run the same `fedlora sweep {spec_file}` "
                    "to finish the rest")
        raise typer.Exit(130) from None
    _write_report(spec.out, None)


def _write_report(folder: Path, out: str | None) -> None:
    from .report_dir import write_report

    path = write_report(Path(folder), Path(out) if out else None)
    _stdout().print(f"report: {path}")


def report(
    folder: Annotated[str, typer.Argument(help="a run, compare or sweep folder")],
    out: Annotated[str | None, typer.Option(help="where to write report.md and figures/ (default: FOLDER)")] = None,
) -> None:
    """Write a markdown report with plots (metric per round with the seeds' spread, aggregation error,
    metric against bytes and simulated time, mean +- std tables) for any results folder."""
    try:
        if not Path(folder).is_dir():
            raise ValueError(f"{folder}: no such folder")
        _write_report(Path(folder), out)
    except USER_ERRORS as err:
        _fail(err)
