"""The issue-8 experiment: HierFedLoRA against flat FedIT, FedEx and HEXA on AG News with uneven devices.

    .venv/bin/python benchmarks/heterogeneity.py                 # seeds 0 and 3 (skips runs already complete)
    .venv/bin/python benchmarks/heterogeneity.py --seeds 0       # one seed
    .venv/bin/python benchmarks/heterogeneity.py --table-only    # only re-read the runs and write the table

Each seed is one ``fedlora compare`` of ``recipes/configs/hierfedlora/minilm_agnews.yaml`` (MiniLM, 20
clients, Dirichlet 0.1, three device classes 4x apart in speed and bandwidth) into ``runs/heterogeneity/
seed<S>``; a seed whose four runs are complete is not re-run. The summary (per method, mean over seeds of
simulated hours and MB to the target accuracy, final and best accuracy) goes to
``benchmarks/results/heterogeneity.json`` and ``docs/heterogeneity_table.md``, the curves of every seed to
``docs/figures/heterogeneity_*.png``.

Seeds 0 and 3: with seeds 1 and 2 no Dirichlet(0.1) draw (flwr-datasets' partitioner, 10 tries) gives all
20 clients the recipe's ``min_partition_size`` of 10 examples, and the run stops with that one-line error.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/configs/hierfedlora/minilm_agnews.yaml"
METHODS = ["hierfedlora", "fedit", "fedex", "hexa"]
# HierFedLoRA with factor averaging at both levels: no corrections to ship (the exact default ships the
# groups' folded residuals to their members and the global one to every client that catches up).
VARIANTS = {"hierfedlora_fedit": ["federation.method_options.rule=fedit",
                                  "federation.method_options.global_rule=fedit"]}
OUT = ROOT / "runs" / "heterogeneity"


def run_seed(seed: int, rounds: int | None) -> float:
    """One compare of every method at ``seed``; returns its wall seconds (0 when already complete)."""
    out = OUT / f"seed{seed}"
    want = rounds or 12
    done = all(_records(out / m) and len(_records(out / m)) >= want for m in METHODS)
    if done:
        return 0.0
    cmd = [str(ROOT / ".venv" / "bin" / "fedlora"), "compare", RECIPE, "--methods", ",".join(METHODS),
           "--out", str(out), "--overwrite", f"seed={seed}"]
    if rounds:
        cmd.append(f"federation.rounds={rounds}")
    return _timed(cmd)


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("FEDLORA_DATA_DIR", str(ROOT.parent / "shared" / "data" / "glue"))
    return env


def _timed(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
    return time.perf_counter() - t0


def run_variant(seed: int, name: str, overrides: list[str], rounds: int | None) -> float:
    """One ``fedlora run`` of the recipe with ``overrides`` into ``runs/heterogeneity/seed<S>/<name>``."""
    run = OUT / f"seed{seed}" / name
    if len(_records(run)) >= (rounds or 12):
        return 0.0
    cmd = [str(ROOT / ".venv" / "bin" / "fedlora"), "run", RECIPE, *overrides, f"seed={seed}",
           f"output_dir={run}", "--overwrite"]
    if rounds:
        cmd.append(f"federation.rounds={rounds}")
    return _timed(cmd)


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarise(seeds: list[int], target: float) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from fedlora.report_costs import cost_curve, time_to_target

    summary = {"target": target, "seeds": seeds, "methods": {}}
    for method in [*METHODS, *VARIANTS]:
        per_seed = []
        for seed in seeds:
            records = _records(OUT / f"seed{seed}" / method)
            if not records:
                continue
            curve = cost_curve(records)
            hit = time_to_target(records, target)
            per_seed.append({
                "seed": seed, "final": curve[-1]["metric"], "best": max(p["metric"] for p in curve),
                "round_to_target": hit["round"] if hit else None,
                "sim_s_to_target": hit["sim_s"] if hit else None,
                "mb_to_target": hit["bytes"] / 1e6 if hit else None,
                "sim_s_total": curve[-1]["sim_s"], "mb_total": curve[-1]["bytes"] / 1e6,
                "wall_s": records[-1].get("wall_time_s"),
            })
        summary["methods"][method] = per_seed
    return summary


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def table(summary: dict) -> str:
    """Per method: each seed's simulated seconds and MB to the target ("—": not reached) and final accuracy,
    then the means over seeds of the final and best accuracy."""
    def fmt(v, spec):
        return "—" if v is None else format(v, spec)

    seeds = summary["seeds"]
    per = " / ".join(f"seed {s}" for s in seeds)
    lines = [f"Target accuracy {summary['target']:.2f}. Per seed ({per}): simulated seconds and MB to the "
             "target, and final accuracy; then means over the seeds.", "",
             "| Method | Sim. s to target | MB to target | Final accuracy | Mean final | Mean best "
             "| Sim. s, 12 rounds | Wall s here |",
             "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for method, rows in summary["methods"].items():
        by_seed = {r["seed"]: r for r in rows}

        def each(key, spec):
            return " / ".join(fmt(by_seed[s][key], spec) if s in by_seed else "·" for s in seeds)

        lines.append("| " + " | ".join([
            method, each("sim_s_to_target", ".1f"), each("mb_to_target", ".1f"), each("final", ".3f"),
            fmt(_mean(r["final"] for r in rows), ".4f"), fmt(_mean(r["best"] for r in rows), ".4f"),
            each("sim_s_total", ".1f"), each("wall_s", ".0f"),
        ]) + " |")
    return "\n".join(lines) + "\n"


def plots(seeds: list[int], target: float) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from fedlora.report_costs import plot_costs

    figures = ROOT / "docs" / "figures"
    for seed in seeds:
        runs = {m: _records(OUT / f"seed{seed}" / m) for m in [*METHODS, *VARIANTS]}
        runs = {m: r for m, r in runs.items() if r}
        if not runs:
            continue
        for path in plot_costs(runs, OUT / f"seed{seed}", target):
            dest = figures / f"heterogeneity_seed{seed}_{path.name.removeprefix('compare_')}"
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(path.read_bytes())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 3])
    parser.add_argument("--rounds", type=int, default=None, help="override federation.rounds (smoke runs)")
    parser.add_argument("--target", type=float, nargs="+", default=[0.8, 0.7],
                        help="target accuracies (the recipe's 0.8, and 0.7)")
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args()
    walls = {}
    if not args.table_only:
        for seed in args.seeds:
            walls[seed] = run_seed(seed, args.rounds)
            for name, overrides in VARIANTS.items():
                walls[f"{seed}/{name}"] = run_variant(seed, name, overrides, args.rounds)
    summaries = [summarise(args.seeds, target) for target in args.target]
    results = ROOT / "benchmarks" / "results" / "heterogeneity.json"
    results.write_text(json.dumps({"by_target": summaries, "wall_s": walls}, indent=2) + "\n")
    (ROOT / "docs").mkdir(exist_ok=True)
    text = "\n".join(table(s) for s in summaries)
    (ROOT / "docs" / "heterogeneity_table.md").write_text(text)
    plots(args.seeds, args.target[0])
    print(text)


if __name__ == "__main__":
    main()
