"""Reporting for federated runs: console and markdown tables from the run log's records.

The engine writes one JSON record per round (:mod:`fedlora.runlog`); this module renders them:

* :func:`summary_table` -- a :class:`rich.table.Table` with one row per round of one run;
* :func:`compare_markdown` -- a markdown table with one row per method;
* :func:`plot_run` / :func:`plot_compare` -- PNG figures, in :mod:`fedlora.report_plots`.

Records are those of :mod:`fedlora.runlog` (its docstring shows one). Only ``round`` is required; any
other key may be missing or ``null`` and is then shown as a dash or left out of a plot. ``wall_time_s`` is
read as the time since the start of the run (cumulative), and ``round_time_s`` as the time of that round
alone. Sizes are reported in MB = 10**6 bytes.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from .runlog import _is_number, total_time

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "compare_markdown",
    "higher_is_better",
    "summary_table",
]

_MB = 1_000_000
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
            _fmt(total_time(records), ".1f"),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"
