"""Figures for :mod:`fedlora.report_dir`: one quantity of several settings on one panel (one partition).

Each setting is drawn as the mean over its seeds at each round, with a shaded band from the smallest to the
largest seed (when it has more than one). Seeds are matched by round number; a seed that lacks a round simply
does not count there. The quantities (keys of :data:`PLOTS`):

* ``metric`` -- the primary metric per round;
* ``agg_error`` -- the aggregation error per round on a log axis, values below
  :data:`fedlora.report_plots.AGG_ERROR_FLOOR` (zeros included) drawn at the floor;
* ``metric_vs_mb`` -- the metric against cumulative MB exchanged (``bytes_up + bytes_down``,
  MB = 10**6 bytes);
* ``metric_vs_sim_time`` -- the metric against cumulative simulated hours (``sim_time_s`` where recorded,
  else the running sum of ``sim_round_s``, as in :mod:`fedlora.report_costs`).

Figures use :func:`fedlora.report_plots._new_figure`: 7 x 4.2 inches at 120 dpi on an Agg canvas, so
840 x 504 px.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import _MB, _by_round
from .report_plots import _agg_error_axis, _clip_floor, _integer_rounds, _new_figure, _save
from .runlog import _is_number

Runs = Mapping[str, Sequence[Sequence[Mapping[str, Any]]]]
"""Setting label (legend entry) to one record list per seed."""

PLOTS = {
    "metric": "{name} per round",
    "agg_error": "aggregation error per round",
    "metric_vs_mb": "{name} against MB exchanged",
    "metric_vs_sim_time": "{name} against simulated time",
}
"""Plot kind to its caption (``{name}`` is the metric's name)."""

MISSING = {
    "metric": "{name}",
    "agg_error": "aggregation error",
    "metric_vs_mb": "{name} with bytes exchanged",
    "metric_vs_sim_time": "{name} with simulated time",
}
"""Plot kind to what must have been recorded for it, for the line that says a plot was skipped."""

_HOUR = 3600.0


def palette(labels: Sequence[str]) -> dict[str, Any]:
    """One colour per label, so a setting keeps its colour in every panel."""
    from matplotlib import colormaps

    colors = colormaps["tab10" if len(labels) <= 10 else "tab20"].colors
    return {label: colors[i % len(colors)] for i, label in enumerate(labels)}


def safe_name(stem: str, taken: set[str]) -> str:
    """A filesystem-safe PNG file name for ``stem``, unique among ``taken`` (which it joins)."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "figure"
    name, i = f"{base}.png", 1
    while name in taken:
        i += 1
        name = f"{base}_{i}.png"
    taken.add(name)
    return name


def png_size(path: Path) -> tuple[int, int]:
    """Width and height from a PNG's IHDR chunk."""
    with path.open("rb") as f:
        return struct.unpack(">II", f.read(24)[16:24])


def _points(records: Sequence[Mapping[str, Any]], kind: str) -> dict[int, tuple[float, float]]:
    """Round to ``(x, y)`` of one seed for plot ``kind``; empty when the seed recorded nothing it needs.

    Records without a numeric round are skipped; a repeated round keeps its last record.
    """
    y_key = "agg_error" if kind == "agg_error" else "metric"
    out: dict[int, tuple[float, float]] = {}
    sent = sim = 0.0
    has_bytes = has_sim = False
    for r in _by_round(records):
        if not _is_number(r.get("round")):
            continue
        for key in ("bytes_up", "bytes_down"):
            if _is_number(r.get(key)):
                sent, has_bytes = sent + float(r[key]), True
        if _is_number(r.get("sim_time_s")):  # cumulative, when the engine logs it
            sim, has_sim = float(r["sim_time_s"]), True
        elif _is_number(r.get("sim_round_s")):
            sim, has_sim = sim + float(r["sim_round_s"]), True
        if not _is_number(r.get(y_key)) or np.isnan(float(r[y_key])):
            continue
        x = {"metric_vs_mb": sent / _MB, "metric_vs_sim_time": sim / _HOUR}.get(kind, float(r["round"]))
        out[int(r["round"])] = (x, float(r[y_key]))
    # Without a single byte (or simulated second) recorded the x axis would be a flat zero: not data.
    if (kind == "metric_vs_mb" and not has_bytes) or (kind == "metric_vs_sim_time" and not has_sim):
        return {}
    return out


def _band(seeds: Sequence[Mapping[int, tuple[float, float]]]) -> tuple[np.ndarray, ...]:
    """``(x, mean, lo, hi)`` per round over the seeds that have that round (x is their mean x)."""
    rounds = sorted(set().union(*seeds))
    rows = []
    for rnd in rounds:
        xs, ys = zip(*(s[rnd] for s in seeds if rnd in s))
        rows.append((np.mean(xs), np.mean(ys), np.min(ys), np.max(ys)))
    return tuple(np.array(col) for col in zip(*rows))


def plot_panel(kind: str, runs: Runs, metric_name: str, path: Path, colors: Mapping[str, Any],
               panel: str = "") -> Path | None:
    """Draw plot ``kind`` (a key of :data:`PLOTS`) of the settings in ``runs`` to ``path``.

    Parameters
    ----------
    kind : str
        Which quantity, see the module docstring.
    runs : mapping of str to sequence of record lists
        Setting label to its seeds' records.
    metric_name : str
        Name of the primary metric (axis label and title).
    path : pathlib.Path
        The PNG to write; its folder must exist.
    colors : mapping of str to colour
        Setting label to colour (see :func:`palette`); labels missing from it get matplotlib's next colour.
    panel : str
        What the panel holds (a partition), added to the title.

    Returns
    -------
    pathlib.Path or None
        ``path``, or None (nothing written) when no setting recorded what the plot needs.
    """
    bands = {}
    for label, seeds in runs.items():
        points = [p for records in seeds if (p := _points(records, kind))]
        if points:
            bands[label] = (len(points), _band(points))
    if not bands:
        return None
    fig, ax = _new_figure()
    log = kind == "agg_error"
    for label, (n, (x, mean, lo, hi)) in bands.items():
        if log:
            mean, lo, hi = (np.array(_clip_floor(list(v))) for v in (mean, lo, hi))
        (line,) = ax.plot(x, mean, marker="o", markersize=3, color=colors.get(label),
                          label=f"{label} (n={n})")
        if n > 1:
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    title = PLOTS[kind].format(name=metric_name)
    ax.set_title(title[0].upper() + title[1:] + (f" — {panel}" if panel else ""))
    if kind in ("metric", "agg_error"):
        _integer_rounds(ax)
    else:
        ax.set_xlabel("MB exchanged (up + down, cumulative)" if kind == "metric_vs_mb"
                      else "simulated hours (cumulative)")
        ax.grid(True, alpha=0.3)
    if log:
        _agg_error_axis(ax)
    else:
        ax.set_ylabel(metric_name)
    ax.legend(title="mean over seeds;\nband: min to max", title_fontsize=8, fontsize=8,
              loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(fig, path)
