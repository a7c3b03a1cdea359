"""Reporting for federated runs: console and markdown tables, and plots, from the run log's records.

The engine writes one JSON record per round (:mod:`fedlora.runlog`); this module renders them:

* :func:`summary_table` -- a :class:`rich.table.Table` with one row per round of one run;
* :func:`compare_markdown` -- a markdown table with one row per method;
* :func:`plot_run` / :func:`plot_compare` -- PNG figures.

Records are those of :mod:`fedlora.runlog` (its docstring shows one). Only ``round`` is required; any other key may be missing or ``null`` and is then shown as a dash or left
out of a plot. ``wall_time_s`` is read as the time since the start of the run (cumulative), and
``round_time_s`` as the time of that round alone. Sizes are reported in MB = 10**6 bytes.

Plots draw on an explicit Agg canvas (:class:`matplotlib.backends.backend_agg.FigureCanvasAgg`), so
they work headless and never touch :mod:`matplotlib.pyplot` or the process-wide backend.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .runlog import _is_number

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from rich.table import Table

__all__ = [
    "AGG_ERROR_FLOOR",
    "compare_markdown",
    "higher_is_better",
    "plot_compare",
    "plot_run",
    "summary_table",
]

"""Name of the per-round metrics log inside a run directory."""

AGG_ERROR_FLOOR = 1e-17
"""Aggregation errors below this (exact zeros included) are drawn at this value on log axes."""

_MB = 1_000_000
_DPI = 120
_DASH = "—"
_LOWER_IS_BETTER = ("loss", "perplexity", "ppl", "error", "mse", "rmse", "mae", "wer", "cer")


# --------------------------------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------------------------------


def higher_is_better(metric_name: str | None) -> bool:
    """Whether a larger value of the named metric is better (False for losses, perplexity, errors)."""
    name = (metric_name or "").lower()
    return not any(word in name for word in _LOWER_IS_BETTER)


def _metric_name(records: Iterable[Mapping[str, Any]]) -> str:
    """The ``metric_name`` of the records (distinct names joined by " / "), or ``"metric"``."""
    names: list[str] = []
    for r in records:
        name = r.get("metric_name")
        if name and str(name) not in names:
            names.append(str(name))
    return " / ".join(names) if names else "metric"


def _round_key(record: Mapping[str, Any]) -> tuple[int, float]:
    rnd = record.get("round")
    return (0, float(rnd)) if _is_number(rnd) else (1, 0.0)


def _by_round(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Records sorted by round (stable; records without a round go last)."""
    return sorted(records, key=_round_key)


def _values(records: Iterable[Mapping[str, Any]], key: str) -> list[float]:
    """The numeric values of ``key``, in round order, missing / null / non-numeric ones dropped."""
    return [float(r[key]) for r in _by_round(records) if _is_number(r.get(key))]


def _series(records: Iterable[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(rounds, values)`` of ``key`` sorted by round; a repeated round keeps its last record."""
    last: dict[int, float] = {}
    for r in records:
        rnd, value = r.get("round"), r.get(key)
        if _is_number(rnd) and _is_number(value):
            last[int(rnd)] = float(value)
    rounds = sorted(last)
    return rounds, [last[k] for k in rounds]


def _last(records: Sequence[Mapping[str, Any]], key: str) -> float | None:
    values = _values(records, key)
    return values[-1] if values else None


def _best(records: Sequence[Mapping[str, Any]], key: str, higher: bool) -> float | None:
    values = [v for v in _values(records, key) if not math.isnan(v)]
    if not values:
        return None
    return max(values) if higher else min(values)


def _total_time(records: Sequence[Mapping[str, Any]]) -> float | None:
    """Largest cumulative ``wall_time_s``; else the sum of ``round_time_s``; else None."""
    wall = _values(records, "wall_time_s")
    if wall:
        return max(wall)
    per_round = _values(records, "round_time_s")
    return sum(per_round) if per_round else None


def _fmt(value: float | None, spec: str) -> str:
    """``format(value, spec)``, or a dash for None."""
    return _DASH if value is None else format(value, spec)


def _fmt_sci(value: float | None) -> str:
    """Scientific notation with 2 significant digits (``1.2e-07``), or a dash."""
    return _fmt(value, ".1e")


def _fmt_mb(n_bytes: float | None) -> str:
    """Bytes as MB: 2 decimals from 1 MB up, 3 significant digits below."""
    if n_bytes is None:
        return _DASH
    mb = n_bytes / _MB
    return f"{mb:,.2f}" if abs(mb) >= 1 else f"{mb:.3g}"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _method_of(records: Sequence[Mapping[str, Any]]) -> str | None:
    for r in records:
        if r.get("method"):
            return str(r["method"])
    return None


# --------------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------------


def summary_table(records: Sequence[Mapping[str, Any]], title: str | None = None) -> Table:
    """A console table of one run, one row per record (sorted by round).

    Parameters
    ----------
    records : sequence of dict
        The run's records, as from :func:`fedlora.runlog.load_metrics`.
    title : str, optional
        Table title; defaults to the run's ``method``.

    Returns
    -------
    rich.table.Table
        Columns: round, the metric (named in the header), eval loss, local metric, train loss,
        aggregation error (scientific notation), MB up, MB down and round time, and with DP-SGD the largest
        epsilon spent so far (at the run's delta), with client-level DP its epsilon so far (at its delta).
        Missing values show a dash.
    """
    from rich.table import Table

    name = _metric_name(records)
    table = Table(title=title if title is not None else _method_of(records), header_style="bold")
    table.add_column("Round", justify="right")
    table.add_column(name.capitalize(), justify="right")
    table.add_column("Eval loss", justify="right")
    table.add_column(f"Local {name}", justify="right")
    table.add_column("Train loss", justify="right")
    table.add_column("Agg. error", justify="right")
    table.add_column("MB up", justify="right")
    table.add_column("MB down", justify="right")
    table.add_column("Time (s)", justify="right")
    private = any(_is_number(r.get("epsilon_max")) for r in records)
    if private:  # DP-SGD: the largest epsilon any client has spent so far, at the run's delta
        delta = next(r["dp_delta"] for r in records if _is_number(r.get("dp_delta")))
        table.add_column(f"eps max (delta {delta:.1e})", justify="right")
    client_level = any(_is_number(r.get("client_epsilon")) for r in records)
    if client_level:  # client-level DP: epsilon of any one client's participation so far
        delta = next(r["client_delta"] for r in records if _is_number(r.get("client_delta")))
        table.add_column(f"client eps (delta {delta:.1e})", justify="right")

    def num(r: Mapping[str, Any], key: str) -> float | None:
        v = r.get(key)
        return float(v) if _is_number(v) else None

    for r in _by_round(records):
        rnd = r.get("round")
        extra = [_fmt(num(r, "epsilon_max"), ".3f")] if private else []
        extra += [_fmt(num(r, "client_epsilon"), ".3f")] if client_level else []
        table.add_row(
            str(rnd) if rnd is not None else _DASH,
            _fmt(num(r, "metric"), ".4f"),
            _fmt(num(r, "eval_loss"), ".4f"),
            _fmt(num(r, "local_metric"), ".4f"),
            _fmt(num(r, "train_loss"), ".4f"),
            _fmt_sci(num(r, "agg_error")),
            _fmt_mb(num(r, "bytes_up")),
            _fmt_mb(num(r, "bytes_down")),
            _fmt(num(r, "round_time_s"), ".1f"),
            *extra,
        )
    return table


def compare_markdown(runs: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
    """A markdown table comparing runs, one row per method.

    Parameters
    ----------
    runs : mapping of str to sequence of dict
        Method (row label) to that run's records.

    Returns
    -------
    str
        Columns: method, final and best metric (best = max, or min for loss-like metrics, see
        :func:`higher_is_better`), final eval loss, mean and max of the per-round ``agg_error``
        (scientific, 2 significant digits), total MB up, total MB down, total time in seconds (the
        last cumulative ``wall_time_s``, or the sum of ``round_time_s``). Missing values show a dash.
        Ends with a newline.
    """
    name = _metric_name(r for recs in runs.values() for r in recs)
    header = [
        "Method",
        f"Final {name}",
        f"Best {name}",
        "Final eval loss",
        "Mean agg. error",
        "Max agg. error",
        "MB up",
        "MB down",
        "Time (s)",
    ]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for method, records in runs.items():
        own_name = _metric_name(records)
        higher = higher_is_better(own_name if own_name != "metric" else name)
        errors = _values(records, "agg_error")
        ups, downs = _values(records, "bytes_up"), _values(records, "bytes_down")
        row = [
            _md_cell(str(method)),
            _fmt(_last(records, "metric"), ".4f"),
            _fmt(_best(records, "metric", higher), ".4f"),
            _fmt(_last(records, "eval_loss"), ".4f"),
            _fmt_sci(sum(errors) / len(errors) if errors else None),
            _fmt_sci(max(errors) if errors else None),
            _fmt_mb(sum(ups) if ups else None),
            _fmt_mb(sum(downs) if downs else None),
            _fmt(_total_time(records), ".1f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# Plots
# --------------------------------------------------------------------------------------------------


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
