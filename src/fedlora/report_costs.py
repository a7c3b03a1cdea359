"""What reaching a result cost: simulated time and bytes to a target metric, metric against cost, rank energy,
and HierFedLoRA's groups. Renders the run log's records (:mod:`fedlora.runlog`) like :mod:`fedlora.report`.

``sim_time_s`` is the cumulative simulated wall-clock of a run (device time model, :mod:`fedlora.sim.clock`);
bytes are cumulative ``bytes_up + bytes_down``. Without an explicit target, :func:`auto_target` takes the
lowest of the runs' best values (for a loss-like metric, the highest), so every run reaches it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .report import _MB, _by_round, _fmt, _md_cell, _metric_name, higher_is_better
from .report_plots import _new_figure, _save
from .runlog import _is_number

_HOUR = 3600.0


def _reached(value: float, target: float, higher: bool) -> bool:
    return value >= target if higher else value <= target


def cost_curve(records: Sequence[Mapping[str, Any]]) -> list[dict[str, float]]:
    """Per round: the metric, cumulative simulated seconds and cumulative bytes (up plus down)."""
    out, sim, sent = [], 0.0, 0.0
    for r in _by_round(records):
        sim = float(r["sim_time_s"]) if _is_number(r.get("sim_time_s")) else sim + float(r.get("sim_round_s") or 0)
        sent += float(r.get("bytes_up") or 0) + float(r.get("bytes_down") or 0)
        if _is_number(r.get("metric")):
            out.append({"round": int(r["round"]), "metric": float(r["metric"]), "sim_s": sim, "bytes": sent})
    return out


def time_to_target(records: Sequence[Mapping[str, Any]], target: float, higher: bool = True) -> dict | None:
    """The first round whose metric reaches ``target``: its round, simulated seconds and bytes; None if never."""
    for point in cost_curve(records):
        if _reached(point["metric"], target, higher):
            return point
    return None


def auto_target(runs: Mapping[str, Sequence[Mapping[str, Any]]], higher: bool) -> float | None:
    """The lowest best metric over the runs (highest for lower-is-better): a target every run reaches."""
    bests = []
    for records in runs.values():
        values = [p["metric"] for p in cost_curve(records)]
        if values:
            bests.append(max(values) if higher else min(values))
    if not bests:
        return None
    return min(bests) if higher else max(bests)


def targets_markdown(runs: Mapping[str, Sequence[Mapping[str, Any]]], target: float | None = None) -> str:
    """A markdown table: per run, the round, simulated hours and MB to reach ``target``, and its totals."""
    name = _metric_name(r for recs in runs.values() for r in recs)
    higher = higher_is_better(name)
    chosen = target if target is not None else auto_target(runs, higher)
    if chosen is None:
        return ""
    how = "given" if target is not None else "the lowest best over these runs" if higher else "the highest best"
    header = ["Method", "Round to target", "Sim. hours to target", "MB to target", f"Final {name}",
              "Sim. hours total"]
    lines = [f"Target {name} {'>=' if higher else '<='} {chosen:.4f} ({how}).", "",
             "| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    for method, records in runs.items():
        curve = cost_curve(records)
        hit = time_to_target(records, chosen, higher)
        row = [_md_cell(str(method)),
               str(hit["round"]) if hit else "not reached",
               _fmt(hit["sim_s"] / _HOUR if hit else None, ".4g"),
               _fmt(hit["bytes"] / _MB if hit else None, ".2f"),
               _fmt(curve[-1]["metric"] if curve else None, ".4f"),
               _fmt(curve[-1]["sim_s"] / _HOUR if curve else None, ".4g")]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def plot_costs(runs: Mapping[str, Sequence[Mapping[str, Any]]], out_dir: str | os.PathLike[str],
               target: float | None = None) -> list[Path]:
    """``compare_metric_vs_time.png`` and ``compare_metric_vs_bytes.png`` (one line per run, the target as
    a dashed line), and ``compare_rank_energy.png`` when the runs logged rank energy."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    name = _metric_name(r for recs in runs.values() for r in recs)
    paths = []
    for key, scale, label, fname in (("sim_s", _HOUR, "simulated hours", "compare_metric_vs_time.png"),
                                     ("bytes", _MB, "MB exchanged (up + down)", "compare_metric_vs_bytes.png")):
        fig, ax = _new_figure()
        for method, records in runs.items():
            curve = cost_curve(records)
            if curve:
                ax.plot([p[key] / scale for p in curve], [p["metric"] for p in curve], marker="o", label=str(method))
        if target is not None:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
        ax.set_xlabel(label)
        ax.set_ylabel(name)
        ax.set_title(f"{name.capitalize()} against {label}")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(_save(fig, out / fname))
    energy = {m: [(int(r["round"]), float(r["rank_energy"])) for r in _by_round(recs)
                  if _is_number(r.get("rank_energy"))]
              for m, recs in runs.items()}
    if any(energy.values()):
        fig, ax = _new_figure()
        for method, points in energy.items():
            if points:
                ax.plot(*zip(*points), marker="o", label=str(method))
        ax.set_xlabel("round")
        ax.set_ylabel("share of update energy above the smallest rank")
        ax.set_title("Rank energy per round (a falling line: collapse toward the smallest rank)")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0))
        paths.append(_save(fig, out / "compare_rank_energy.png"))
    return paths


def plot_groups(histograms: Mapping[str, np.ndarray], groups: Sequence[Sequence[str]], plan: Mapping | None,
                out_dir: str | os.PathLike[str], fname: str = "groups.png") -> Path:
    """Each group's pooled label histogram (shares, stacked) beside the global one, labelled with its members,
    depth and local steps per sync (``plan["groups"][g]`` with ``depth`` and ``tau``, when given)."""
    classes = len(next(iter(histograms.values())))
    pooled = [np.sum([histograms[c] for c in members], axis=0) for members in groups]
    total = np.sum(list(histograms.values()), axis=0)
    bars = [*pooled, total]
    labels = []
    for g, members in enumerate(groups):
        text = f"group {g}\n{len(members)} clients"
        if plan is not None:
            p = plan["groups"][g]
            text += f"\nL={p['depth']} tau={p['tau']}"
        labels.append(text)
    labels.append("global")
    fig, ax = _new_figure(width=max(6.0, 1.2 * len(bars) + 3))
    bottom = np.zeros(len(bars))
    for k in range(classes):
        share = np.array([b[k] / b.sum() if b.sum() else 0.0 for b in bars])
        ax.bar(range(len(bars)), share, bottom=bottom, label=f"class {k}")
        bottom += share
    ax.set_xticks(range(len(bars)), labels, fontsize=8)
    ax.set_ylabel("share of examples")
    ax.set_title("HierFedLoRA groups: label mix, depth L and local steps per sync")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(fig, Path(out_dir) / fname)
