"""A markdown report with PNG plots for any results folder: one run, a compare, or a sweep.

:func:`load_folder` reads the folder into :class:`Cell` s (one per run); :func:`write_report` groups them into
settings and writes ``report.md`` and ``figures/*.png``. The folder kinds:

* run -- ``folder/metrics.jsonl``: one cell;
* compare -- ``folder/<name>/metrics.jsonl``: one cell per subfolder (what ``fedlora compare`` writes);
* sweep -- ``folder/sweep.json`` = ``{"axes": {key: [values]}, "cells": [{"name", "dir", "keys", "status"}]}``
  with ``dir`` relative to the folder: one cell per entry whose status is ``"done"`` and whose log has a
  record; the others are counted in the report as not done.

A *setting* is a cell's keys without ``"seed"``: cells of one setting are replicates (seeds), and tables show
the mean ± std (``ddof=1``) over them of each one's final value. Records are those of :mod:`fedlora.runlog`;
any value may be missing or ``null`` and is then left out. Nothing is printed: warnings go to the
``"fedlora"`` logger.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from .report import _DASH, _MB, _fmt_mb, _fmt_sci, _md_cell, _method_of, _metric_name, _series
from .report import _values, higher_is_better
from .report_dir_plots import MISSING, PLOTS, palette, plot_panel, png_size, safe_name
from .runlog import METRICS_FILE, load_metrics, total_time

__all__ = ["Cell", "load_folder", "write_report"]

log = logging.getLogger("fedlora")

SWEEP_FILE = "sweep.json"
REPORT_FILE = "report.md"
FIGURES_DIR = "figures"
_BARE = ("method", "partition")  # keys shown by value alone in labels; others as key=value


@dataclass
class Cell:
    """One run of a results folder: its name, the keys that set it apart (method, partition, seed, ...), its
    per-round records (as from :func:`fedlora.runlog.load_metrics`) and its run folder (its other files)."""

    name: str
    keys: dict[str, object]
    records: list[dict]
    path: Path


@dataclass
class _Folder:
    """What :func:`_scan` found: kind, readable cells, sweep cells left out (count by status), axes order."""

    kind: str
    cells: list[Cell]
    left_out: dict[str, int] = field(default_factory=dict)
    axes: dict[str, list] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------------
# Reading a folder
# --------------------------------------------------------------------------------------------------


def _read(path: Path) -> list[dict] | None:
    """The records of a metrics file, or None when it is missing, unreadable or empty (logged)."""
    try:
        records = load_metrics(path)
    except (OSError, ValueError) as err:
        log.warning("skipping %s: %s", path, err)
        return None
    return records or None


def _scan_sweep(folder: Path) -> _Folder:
    path = folder / SWEEP_FILE
    try:
        spec = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable ({' '.join(str(err).split())})") from None
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: not a JSON object")
    axes = spec.get("axes") if isinstance(spec.get("axes"), dict) else {}
    cells: list[Cell] = []
    left_out: dict[str, int] = {}
    for entry in spec.get("cells") or []:
        entry = entry if isinstance(entry, dict) else {}
        name = str(entry.get("name"))
        status = str(entry.get("status") or "unknown")
        records, run_dir = None, folder / str(entry.get("dir") or f"cells/{name}")
        if status == "done":
            records = _read(run_dir / METRICS_FILE)
        if records is None:
            why = "done without records" if status == "done" else status
            left_out[why] = left_out.get(why, 0) + 1
            continue
        keys = dict(entry.get("keys") or {})
        keys.setdefault("method", _method_of(records) or name)
        cells.append(Cell(name, keys, records, run_dir))
    return _Folder("sweep", cells, left_out, {k: list(v) for k, v in axes.items() if isinstance(v, list)})


def _scan_compare(folder: Path) -> _Folder:
    runs = [(sub.name, records) for sub in sorted(folder.iterdir())
            if (sub / METRICS_FILE).is_file() and (records := _read(sub / METRICS_FILE))]
    methods = [_method_of(records) or name for name, records in runs]
    # Two subfolders of one method would otherwise pool as seeds of one setting: tell them apart by name.
    return _Folder("compare", [Cell(name, {"method": m if methods.count(m) == 1 else name}, records,
                                    folder / name) for (name, records), m in zip(runs, methods)])


def _scan(folder: Path) -> _Folder:
    """Recognise the folder's kind and read its cells; ValueError (one line) when nothing is readable."""
    if not folder.is_dir():
        raise ValueError(f"{folder}: not a folder")
    if (folder / SWEEP_FILE).is_file():
        found = _scan_sweep(folder)
    elif (folder / METRICS_FILE).is_file():
        records = _read(folder / METRICS_FILE)
        name = folder.resolve().name
        cells = [Cell(name, {"method": _method_of(records) or name}, records, folder)] if records else []
        found = _Folder("run", cells)
    else:
        found = _scan_compare(folder)
    if not found.cells:
        raise ValueError(f"{folder}: no readable results (a {METRICS_FILE}, subfolders with one, "
                         f"or a {SWEEP_FILE} with a done cell)")
    return found


def load_folder(folder: Path) -> list[Cell]:
    """The runs in a results folder (a run, a compare or a sweep; see the module docstring).

    Raises
    ------
    ValueError
        One line naming the folder, when it holds no readable run (or no done sweep cell).
    """
    return _scan(Path(folder)).cells


# --------------------------------------------------------------------------------------------------
# Settings and their grid (rows: method and other varying keys; columns: partitions)
# --------------------------------------------------------------------------------------------------


def _frozen(value: object) -> str:
    """A hashable stand-in for a key's value (values may be lists or dicts)."""
    return json.dumps(value, sort_keys=True, default=str)


def _ordered(cells: Sequence[Cell], key: str, axes: Mapping[str, list]) -> list[object]:
    """The distinct values of ``key``: in the sweep's axis order, then in order of first appearance."""
    present = {_frozen(c.keys.get(key)): c.keys.get(key) for c in cells}
    order = [_frozen(v) for v in axes.get(key, [])] + list(present)
    return [present[k] for k in dict.fromkeys(order) if k in present]


def _show(key: str, value: object) -> str:
    return str(value) if key in _BARE else f"{key}={value}"


@dataclass
class _Grid:
    """Cells laid out for tables: row label and column (a partition, or "" when it does not vary) to seeds."""

    rows: list[str]
    cols: list[str]
    seeds: dict[tuple[str, str], list[Cell]]
    constant: dict[str, object]


def _grid(cells: Sequence[Cell], axes: Mapping[str, list]) -> _Grid:
    keys = list(dict.fromkeys([*axes, *(k for c in cells for k in c.keys)]))
    values = {k: _ordered(cells, k, axes) for k in keys if k != "seed"}
    varying = [k for k, v in values.items() if len(v) > 1]
    constant = {k: v[0] for k, v in values.items() if len(v) == 1}
    row_keys = ["method", *(k for k in varying if k not in ("method", "partition"))]
    by_column = "partition" in varying
    methods = [_frozen(m) for m in values.get("method", [])]
    seeds: dict[tuple[str, str], list[Cell]] = {}
    rank: dict[str, tuple[int, int]] = {}
    for i, c in enumerate(cells):
        row = " · ".join(_show(k, c.keys.get(k)) for k in row_keys)
        col = str(c.keys.get("partition")) if by_column else ""
        seeds.setdefault((row, col), []).append(c)
        # rows grouped by method (its axis order), then in order of first appearance
        rank.setdefault(row, (methods.index(_frozen(c.keys.get("method"))), i))
    for group in seeds.values():
        group.sort(key=lambda c: _frozen(c.keys.get("seed")))
    cols = [str(v) for v in values["partition"]] if by_column else [""]
    return _Grid(sorted(rank, key=rank.__getitem__), cols, seeds, constant)


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def _recorded(records: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    """The values of ``key`` in round order (records without a round, NaN, missing skipped)."""
    return [v for v in _series(records, key)[1] if not np.isnan(v)]


def _final(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    """The value of ``key`` at the last round that has one."""
    values = _recorded(records, key)
    return values[-1] if values else None


LAST_ROUNDS = 3
"""How many final rounds the smoothed metric table averages."""


def _last_rounds_mean(records: Sequence[Mapping[str, Any]], key: str,
                      rounds: int = LAST_ROUNDS) -> float | None:
    """The mean of ``key`` over the last ``rounds`` rounds that have one: less at the mercy of which clients
    the last round happened to sample than the final value alone."""
    values = _recorded(records, key)[-rounds:]
    return float(np.mean(values)) if values else None


def _final_named(records: Sequence[Mapping[str, Any]], name: str) -> float | None:
    """The last value of ``metrics[name]`` in round order."""
    flat = [{"round": r.get("round"), "v": r["metrics"].get(name)} for r in records
            if isinstance(r.get("metrics"), dict)]
    return _final(flat, "v")


def _total_bytes(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Bytes exchanged over all rounds (up plus down); None when neither was recorded."""
    sent = _values(records, "bytes_up") + _values(records, "bytes_down")
    return float(sum(sent)) if sent else None


def _per_mb(records: Sequence[Mapping[str, Any]]) -> float | None:
    metric, sent = _final(records, "metric"), _total_bytes(records)
    return metric / (sent / _MB) if metric is not None and sent else None


def _bold(text: str, bold: bool) -> str:
    return f"**{text}**" if bold else text


def _mean_std(values: Sequence[float], best: bool) -> str:
    """``mean ± std (n=k)``, std with ddof=1; the mean alone for one seed; the mean bold when ``best``."""
    mean = _bold(format(float(np.mean(values)), ".4f"), best)
    std = f" ± {float(np.std(values, ddof=1)):.4f}" if len(values) > 1 else ""
    return f"{mean}{std} (n={len(values)})"


def _mean_as(fmt: Callable[[float], str]) -> Callable[[list[float], bool], str]:
    """Format the mean of the seeds' values with ``fmt``, bold when best."""
    return lambda values, best: _bold(fmt(float(np.mean(values))), best)


_Column = tuple[str, Callable[[list[dict]], float | None], Callable[[list[float], bool], str], bool | None]
"""A table column per partition: header, value of one cell, format of the seeds' values, higher is better
(None: no best is marked)."""


def _table(grid: _Grid, columns: Sequence[_Column]) -> str:
    """A markdown table of the grid: a row per row label, ``columns`` for each partition; the best mean of
    each column in bold (when at least two rows have one)."""
    header = ["Setting"]
    for col in grid.cols:
        for title, *_ in columns:
            header.append(title if not col else col if len(columns) == 1 else f"{col} {title}")
    body: dict[str, list[str]] = {row: [] for row in grid.rows}
    for col in grid.cols:
        for _, value, fmt, higher in columns:
            got = {}
            for row in grid.rows:
                vals = [v for c in grid.seeds.get((row, col), []) if (v := value(c.records)) is not None]
                if vals:
                    got[row] = vals
            means = {row: float(np.mean(v)) for row, v in got.items()}
            best = (max if higher else min)(means.values()) if higher is not None and len(means) > 1 else None
            for row in grid.rows:
                body[row].append(fmt(got[row], means[row] == best) if row in got else _DASH)
    lines = ["| " + " | ".join(_md_cell(h) for h in header) + " |",
             "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join([_md_cell(row), *cells]) + " |" for row, cells in body.items()]
    return "\n".join(lines) + "\n"


def _tables(grid: _Grid, name: str, named: Sequence[str]) -> list[str]:
    """Markdown sections: the primary metric, each named metric, aggregation error, equal communication."""
    higher = higher_is_better(name) if " / " not in name else None  # mixed metrics: no best to mark
    out = [f"## Final {name}\n",
           "Mean ± std over seeds (ddof=1) of each cell's final value; n = seeds. "
           "Bold: the best mean in its column.\n",
           _table(grid, [(name, lambda r: _final(r, "metric"), _mean_std, higher)])]
    out += [f"## Mean {name} over the last {LAST_ROUNDS} rounds\n",
            f"Each cell's mean over its last {LAST_ROUNDS} rounds, then mean ± std over seeds: the final "
            "value alone depends on which clients the last round sampled.\n",
            _table(grid, [(name, partial(_last_rounds_mean, key="metric"), _mean_std, higher)])]
    for metric in named:
        out += [f"## Final {metric} (from `metrics`)\n",
                _table(grid, [(metric, partial(_final_named, name=metric), _mean_std,
                               higher_is_better(metric))])]
    mean_sci, mean_mb = _mean_as(_fmt_sci), _mean_as(_fmt_mb)
    mean_g = _mean_as(lambda x: f"{x:.4g}")
    out += ["## Final aggregation error\n", "Mean over seeds of each cell's final `agg_error`.\n",
            _table(grid, [("agg. error", lambda r: _final(r, "agg_error"), mean_sci, None)])]
    # metric per MB only ranks for a higher-is-better metric (a loss per MB means nothing)
    out += ["## Equal communication\n",
            f"Total MB exchanged (up + down over all rounds, MB = 10^6 bytes) and final {name} per MB, "
            "each the mean over seeds.\n",
            _table(grid, [("MB", _total_bytes, mean_mb, None),
                          (f"{name}/MB", _per_mb, mean_g, True if higher else None)])]
    return out


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------


def _header(folder: Path, found: _Folder, grid: _Grid) -> list[str]:
    cells = found.cells
    lines = [f"# Report: {folder.resolve().name}\n", f"- Folder: `{folder}`", f"- Kind: {found.kind}",
             f"- Cells: {len(cells)}"]
    if found.kind == "sweep":
        n, why = sum(found.left_out.values()), ", ".join(f"{k}: {c}" for k, c in found.left_out.items())
        lines.append(f"- Cells not done: {n}" + (f" ({why}), left out of the tables and plots" if n else ""))
    if grid.constant:
        lines.append("- Constant keys: " + " · ".join(f"{k}={v}" for k, v in grid.constant.items()))
    seeds = _ordered([c for c in cells if "seed" in c.keys], "seed", found.axes)
    if seeds:
        lines.append(f"- Seeds: {', '.join(map(str, seeds))}")
    runs = {c.path: c for c in cells}  # the centralized ceiling is one run serving every partition's column
    walls = [t for c in runs.values() if (t := total_time(c.records)) is not None]
    total = f"{sum(walls):,.1f} s = {sum(walls) / 3600:.2f} h" if walls else _DASH
    lines.append(f"- Total wall time: {total} (sum over the {len(runs)} runs of the last `wall_time_s`)\n")
    return lines


def write_report(folder: Path, out: Path | None = None) -> Path:
    """Write a markdown report with plots for a results folder.

    Parameters
    ----------
    folder : pathlib.Path
        A run, compare or sweep folder (see the module docstring).
    out : pathlib.Path, optional
        Where to write; defaults to ``folder``. Created if missing.

    Returns
    -------
    pathlib.Path
        ``out / "report.md"``: a header (folder, kind, cells, cells not done, constant keys, seeds, total
        wall time), tables of the final primary metric, of each metric named in ``metrics``, of the final
        aggregation error and of MB exchanged and metric per MB, then per partition (or once) four plots
        under ``out / "figures"``: metric per round, aggregation error per round, metric against MB and
        against simulated time. Each is linked relative to the report, with its pixel size; a plot whose
        data was never recorded is replaced by a line saying so.

    Raises
    ------
    ValueError
        When the folder holds nothing readable (see :func:`load_folder`).
    """
    folder = Path(folder)
    found = _scan(folder)
    out = Path(out) if out is not None else folder
    figures = out / FIGURES_DIR
    figures.mkdir(parents=True, exist_ok=True)
    grid = _grid(found.cells, found.axes)
    records = [r for c in found.cells for r in c.records]
    name = _metric_name(records)
    named = list(dict.fromkeys(k for r in records if isinstance(r.get("metrics"), dict)
                               for k in r["metrics"]))
    if named == [name]:  # one official metric: its table would repeat the headline one
        named = []
    lines = _header(folder, found, grid) + _tables(grid, name, named) + ["## Plots\n"]
    colors = palette(grid.rows)
    taken: set[str] = set()
    for col in grid.cols:
        if col:
            lines.append(f"### {col}\n")
        runs = {row: [c.records for c in grid.seeds[(row, col)]]
                for row in grid.rows if (row, col) in grid.seeds}
        for kind, caption in PLOTS.items():
            where = f", {col}" if col else ""
            path = figures / safe_name(f"{kind}_{col}" if col else kind, taken)
            if plot_panel(kind, runs, name, path, colors, col) is None:
                lines.append(f"_No {MISSING[kind].format(name=name)} recorded{where}: plot skipped._\n")
                continue
            width, height = png_size(path)
            alt = re.sub(r"[\[\]]", "", caption.format(name=name) + where)
            lines.append(f"![{alt}]({FIGURES_DIR}/{path.name}) ({width} x {height} px)\n")
    report = out / REPORT_FILE
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
