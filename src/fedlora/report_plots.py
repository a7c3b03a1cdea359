"""Plots of federated runs from the run log's records (tables are in :mod:`fedlora.report`).

* :func:`plot_run` -- one run's metric and aggregation error per round;
* :func:`plot_compare` -- several runs against each other, and their bytes exchanged.

Plots draw on an explicit Agg canvas (:class:`matplotlib.backends.backend_agg.FigureCanvasAgg`), so
they work headless and never touch :mod:`matplotlib.pyplot` or the process-wide backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .report import _MB, _method_of, _metric_name, _series, _values

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = ["AGG_ERROR_FLOOR", "plot_compare", "plot_run"]

AGG_ERROR_FLOOR = 1e-17
"""Aggregation errors below this (exact zeros included) are drawn at this value on log axes."""

_DPI = 120

def _new_figure(width: float = 7.0, height: float = 4.2) -> tuple[Figure, Axes]:
    """A figure on its own Agg canvas (headless; no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def _save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=_DPI, format="png")
    return path


def _integer_rounds(ax: Axes) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.grid(True, alpha=0.3)


def _no_data(ax: Axes, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} recorded", ha="center", va="center", transform=ax.transAxes, color="0.4")


def _clip_floor(values: Sequence[float]) -> list[float]:
    """Values below :data:`AGG_ERROR_FLOOR` (0 included) raised to it; NaN kept (drawn as a gap)."""
    return [v if math.isnan(v) else max(v, AGG_ERROR_FLOOR) for v in values]


def _agg_error_axis(ax: Axes, min_decades: float = 2.0) -> None:
    """Log y-axis for aggregation errors, call after plotting; spans at least ``min_decades``."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    if lo > 0 and hi > 0 and math.log10(hi / lo) < min_decades:
        mid = math.sqrt(lo * hi)
        half = 10 ** (min_decades / 2)
        new_lo = max(mid / half, AGG_ERROR_FLOOR / 2)
        ax.set_ylim(new_lo, new_lo * 10**min_decades)
    floor = f"{AGG_ERROR_FLOOR:.0e}"
    ax.set_ylabel(f"aggregation error (log scale)\nvalues < {floor}, incl. 0, drawn at {floor}")
    ax.axhline(AGG_ERROR_FLOOR, color="0.6", linestyle=":", linewidth=1)


def plot_run(records: Sequence[Mapping[str, Any]], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Plot one run: ``metric.png`` and ``agg_error.png`` in ``out_dir``.

    Parameters
    ----------
    records : sequence of dict
        The run's records.
    out_dir : str or os.PathLike
        Output directory; created if missing.

    Returns
    -------
    list of pathlib.Path
        ``[out_dir / "metric.png", out_dir / "agg_error.png"]``. ``metric.png`` shows the global metric
        and (when recorded) the clients' local metric per round; ``agg_error.png`` the overall
        (``agg_error``) and, when recorded, worst-module (``agg_error_max``) aggregation error per round
        on a log axis, zeros drawn at :data:`AGG_ERROR_FLOOR`.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _metric_name(records)
    method = _method_of(records)
    suffix = f" — {method}" if method else ""

    fig, ax = _new_figure()
    drawn = False
    for key, label, style in (("metric", f"global {name}", "o-"), ("local_metric", f"local {name}", "s--")):
        rounds, values = _series(records, key)
        if rounds:
            ax.plot(rounds, values, style, label=label)
            drawn = True
    if drawn:
        ax.legend()
    else:
        _no_data(ax, name)
    ax.set_title(f"{name.capitalize()} per round{suffix}")
    ax.set_ylabel(name)
    _integer_rounds(ax)
    paths = [_save(fig, out / "metric.png")]

    fig, ax = _new_figure()
    drawn = False
    for key, label, style in (("agg_error", "all modules", "o-"), ("agg_error_max", "worst module", "^--")):
        rounds, values = _series(records, key)
        if rounds:
            ax.plot(rounds, _clip_floor(values), style, label=label)
            drawn = True
    _agg_error_axis(ax)
    if drawn:
        ax.legend()
    else:
        _no_data(ax, "aggregation error")
    ax.set_title(f"Aggregation error per round{suffix}")
    _integer_rounds(ax)
    paths.append(_save(fig, out / "agg_error.png"))
    return paths


def plot_compare(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike[str]
) -> list[Path]:
    """Plot several runs against each other.

    Parameters
    ----------
    runs : mapping of str to sequence of dict
        Method (legend label) to that run's records. Each method keeps one colour in every figure.
    out_dir : str or os.PathLike
        Output directory; created if missing.

    Returns
    -------
    list of pathlib.Path
        ``compare_metric.png`` (task metric per round, one line per method), ``compare_agg_error.png``
        (aggregation error per round on a log axis; values below :data:`AGG_ERROR_FLOOR`, exact zeros
        included, are drawn at the floor, as the axis label says) and ``compare_bytes.png`` (total MB
        uploaded and downloaded per method, stacked bars labelled with the total).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _metric_name(r for recs in runs.values() for r in recs)
    from matplotlib import colormaps

    palette = colormaps["tab10"].colors
    colors = {m: palette[i % len(palette)] for i, m in enumerate(runs)}
    markers = "os^Dv<>ph*"
    marker = {m: markers[i % len(markers)] for i, m in enumerate(runs)}

    paths: list[Path] = []
    for key, fname, title, log in (
        ("metric", "compare_metric.png", f"{name.capitalize()} per round", False),
        ("agg_error", "compare_agg_error.png", "Aggregation error per round", True),
    ):
        fig, ax = _new_figure()
        drawn = False
        for method, records in runs.items():
            rounds, values = _series(records, key)
            if not rounds:
                continue
            ax.plot(
                rounds,
                _clip_floor(values) if log else values,
                marker=marker[method],
                color=colors[method],
                label=str(method),
            )
            drawn = True
        if log:
            _agg_error_axis(ax)
        else:
            ax.set_ylabel(name)
        if drawn:
            ax.legend(title="method", loc="upper left", bbox_to_anchor=(1.01, 1.0))
        else:
            _no_data(ax, "aggregation error" if log else name)
        ax.set_title(title)
        _integer_rounds(ax)
        paths.append(_save(fig, out / fname))

    methods = [str(m) for m in runs]
    up = [sum(_values(recs, "bytes_up")) / _MB for recs in runs.values()]
    down = [sum(_values(recs, "bytes_down")) / _MB for recs in runs.values()]
    fig, ax = _new_figure(width=max(7.0, 1.1 * len(methods) + 4.5))
    x = list(range(len(methods)))
    ax.bar(x, up, color="tab:blue", label="upload\n(clients → server)")
    ax.bar(x, down, bottom=up, color="tab:orange", label="download\n(server → clients)")
    top = max((u + d for u, d in zip(up, down)), default=0.0)
    for xi, u, d in zip(x, up, down):
        ax.annotate(
            f"{u + d:.3g}",
            (xi, u + d),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    crowded = len(methods) > 5
    ax.set_xticks(x, methods, rotation=30 if crowded else 0, ha="right" if crowded else "center")
    ax.set_ylim(0, top * 1.15 if top > 0 else 1.0)
    ax.set_ylabel("total MB (10^6 bytes)")
    ax.set_xlabel("method")
    ax.set_title("Total communication per method")
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
    paths.append(_save(fig, out / "compare_bytes.png"))
    return paths
