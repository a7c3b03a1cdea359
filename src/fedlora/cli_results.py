"""``fedlora sweep`` and ``fedlora report``: many runs, one progress view, one report.

    fedlora sweep SWEEP.yaml [--out DIR] [--data-dir DIR] [--dry-run] [--workers N] [--no-report]
    fedlora report DIR [--out DIR]

A sweep skips finished cells, resumes a killed cell from its checkpoint and starts the others; it checks
every cell's config before training any. Several processes may share one sweep (``--workers N`` starts
them): each claims a cell before running it, and takes up a cell whose process died. Its progress says the
time left at the pace of the runs finished so far. Errors end in one line and exit 2, as everywhere in the CLI.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from .cli import USER_ERRORS, _error_line, _fail, _setup_logging, _stdout, console


def register_commands(app: typer.Typer) -> None:
    app.command()(sweep)
    app.command()(report)


def time_left(elapsed_s: float, finished: int, remaining: int) -> str | None:
    """``about 4h 50m left`` for ``remaining`` runs at the pace of ``elapsed_s`` per ``finished`` runs;
    ``None`` while no run has finished (no pace yet)."""
    if finished <= 0:
        return None
    if remaining <= 0:
        return "none left"
    seconds = round(elapsed_s / finished * remaining)
    if seconds < 60:
        return "under a minute left"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"about {hours}h {minutes:02d}m left" if hours else f"about {minutes}m left"


class _SweepProgress:
    """One view for the sweep: cells done, and the rounds of the cell running now. Where the output is not a
    terminal (a background sweep writing a log), one line per finished run says how far it is instead.

    The time left is at the pace of every run done, from their records (``run_seconds`` of a run's folder),
    each on one of ``workers`` processes: a run this process resumed, or one that ran beside other jobs,
    would skew a pace taken from this process's clock alone."""

    def __init__(self, total: int, done: set, run_seconds: Callable[[Path], float | None], workers: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        self.bars = Progress(*columns, console=console, disable=not console.is_terminal)
        self.cells = self.bars.add_task("sweep cells", total=total, completed=len(done))
        self.rounds = self.bars.add_task("rounds", total=1, visible=False)
        self.total, self.done = total, set(done)
        self.run_seconds, self.workers = run_seconds, workers
        self.took: dict[Path, float | None] = {}  # a finished run's time never changes: read its records once

    def time_left(self) -> str | None:
        """The time left for the runs not done, at the recorded pace of the runs done."""
        for d in self.done - self.took.keys():
            self.took[d] = self.run_seconds(d)
        took = [t for d in self.done if (t := self.took[d]) is not None]
        return time_left(sum(took), len(took) * self.workers, self.total - len(self.done))

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

    def cell_done(self, done: set) -> None:
        """A cell of this process ended; ``done``: every finished run's folder, this process's or another's."""
        self._count(done)

    def _count(self, done: set) -> None:
        if done == self.done:
            return
        self.done = set(done)
        left = self.time_left()
        self.bars.update(self.cells, completed=len(done),
                         description=f"sweep cells ({left})" if left else "sweep cells")
        if not console.is_terminal:
            console.print(f"sweep: {len(done)}/{self.total} runs done" + (f", {left}" if left else ""))

    def wait_for(self, procs, done: Callable[[], set]) -> None:
        """Wait for the other workers, the cells bar following what they finish."""
        self.bars.update(self.rounds, visible=False)
        while any(p.poll() is None for p in procs):
            self._count(done())
            time.sleep(2)
        self._count(done())


def sweep(
    spec_file: Annotated[str, typer.Argument(help="the sweep file (YAML: config, overrides, methods, partitions, "
                                             "seeds, ranks, lrs, out)")],
    out: Annotated[str | None, typer.Option(help="sweep folder (default: the file's out)")] = None,
    data_dir: Annotated[str | None, typer.Option(help="offline data folder (default $FEDLORA_DATA_DIR)")] = None,
    dry_run: Annotated[bool, typer.Option(help="check every cell and write sweep.json; train nothing")] = False,
    workers: Annotated[int, typer.Option(min=1, help="processes sharing the cells, cores / N threads each (logs "
                                         "in OUT/workers/)")] = 1,
    write_report: Annotated[bool, typer.Option("--report/--no-report", help="write the report once every cell "
                                               "is done")] = True,
    of_workers: Annotated[int, typer.Option(hidden=True, help="this process is one of N sharing the sweep (set "
                                            "by --workers), for the pace")] = 0,
) -> None:
    """Run methods x partitions x seeds (x ranks, x lrs): resumable, then write the report. Several
    `fedlora sweep` of one file may run at once (--workers starts them): no cell runs twice."""
    from . import sweep as sw
    from .cli_workers import check_workers, start_workers, stop_workers, threads_per_worker

    cell, procs = None, []
    try:
        spec = sw.load_sweep(spec_file, out)
        cells = sw.plan_cells(spec, data_dir)
        from .sim.engine import Simulation

        configs = {c.name: sw.cell_config(spec, c) for c in cells}
        for cfg in configs.values():  # every cell's method, options and model, before any training
            Simulation.check(cfg)

        def statuses() -> dict[str, str]:  # read from disk: other processes may be running cells
            return {c.name: sw.cell_status(c, configs[c.name].federation.rounds) for c in cells}

        def done_runs(now: dict[str, str] | None = None) -> set[Path]:
            now = now or statuses()
            return {c.dir for c in cells if now[c.name] == "done"}

        status = statuses()
        sw.write_manifest(spec, cells, status)
        runs = {c.dir: c for c in cells}  # a centralized run serves every partition: run it once
        todo = [c for d, c in runs.items() if status[c.name] != "done"]
        workers = min(workers, max(len(todo), 1))
        view = _SweepProgress(len(runs), done_runs(status), lambda d: sw.run_seconds(runs[d]), of_workers or workers)
        left = view.time_left() if todo else None  # the runs already done give the pace before any new one ends
        console.print(f"sweep: {len(runs)} runs ({len(runs) - len(todo)} done, {len(todo)} to run) "
                      f"in {escape(str(spec.out))}" + (f"; {left} at the pace of the runs done" if left else ""),
                      soft_wrap=True)
        if dry_run:
            return
        if workers > 1:
            if not sw.claims_work():
                raise ValueError("--workers needs file locks (fcntl), which this system lacks; run with --workers 1")
            import torch

            procs = start_workers(spec_file, spec.out, data_dir, workers - 1)
            torch.set_num_threads(threads_per_worker(workers))
        with view:
            ran = True
            while ran:  # again until a pass runs nothing: a cell whose process died is free again
                ran = False
                for cell in todo:
                    with sw.claim(spec.out, cell.dir.name) as held:
                        state = sw.cell_status(cell, configs[cell.name].federation.rounds)
                        if not held or state == "done":  # another process runs it, or has finished it
                            continue
                        if state == "pending" and cell.dir.exists():  # killed before its first checkpoint
                            import shutil

                            shutil.rmtree(cell.dir)
                        _setup_logging(cell.dir)  # after the clean-up, which would take the run.log with it
                        view.start_cell(cell.name)
                        sim = Simulation.resume(cell.dir) if state == "partial" else Simulation(configs[cell.name])
                        sim.run(on_event=view)
                        ran = True
                    now = statuses()  # one read of every cell's records serves the manifest and the bar
                    sw.write_manifest(spec, cells, now)
                    view.cell_done(done_runs(now))
            cell = None
            view.wait_for(procs, done_runs)
        check_workers(procs, spec.out)
        status = statuses()
        sw.write_manifest(spec, cells, status)
    except USER_ERRORS as err:
        stop_workers(procs)
        _fail(err)
    except KeyboardInterrupt:
        stop_workers(procs)
        where = f" (cell {cell.name})" if cell is not None else ""
        _error_line(f"interrupted{where}; finished cells are kept: run the same `fedlora sweep {spec_file}` "
                    "to finish the rest")
        raise typer.Exit(130) from None
    running = {c.dir for c in cells if status[c.name] != "done"}
    if running:  # held by processes this one did not start: the last of them writes the report
        console.print(f"sweep: {len(running)} runs are held by other processes; the last to finish writes the "
                      "report (if none is running, run the sweep again)")
    elif write_report:
        with sw.claim(spec.out, "report") as held:  # two processes finishing together: one report
            if held:
                _write_report(spec.out, None)


def _write_report(folder: Path, out: str | None) -> None:
    from .report_dir import write_report

    path = write_report(Path(folder), Path(out) if out else None)
    _stdout().print(f"report: {escape(str(path))}")


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
