"""The issue-10 experiment: metric against epsilon for FedIT, FFA-LoRA, FRA, FRA->FFA and HEXA under DP-SGD.

    .venv/bin/python benchmarks/privacy.py                # every run (skips complete ones, resumes partial ones)
    .venv/bin/python benchmarks/privacy.py --table-only   # re-read the runs, write the table and the plot

Base: ``recipes/configs/privacy/minilm_sst2.yaml`` (MiniLM, SST-2, 10 clients, Dirichlet 0.5, 5 per round,
5 rounds, 30 local steps). Each (method, epsilon) is one ``fedlora run`` into
``runs/privacy/eps<E>/<method>`` with ``privacy.target_epsilon=E`` (sample-level DP-SGD through Opacus, clip
1.0, RDP accountant, delta 1/(10 n) of the smallest client), and ``eps_none`` without DP. Results:
``benchmarks/results/privacy.json``, ``docs/privacy_table.md``, ``docs/figures/privacy_metric_vs_epsilon.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/configs/privacy/minilm_sst2.yaml"
METHODS = {
    "fedit": ["federation.method=fedit"],
    "ffa": ["federation.method=ffa"],
    "fra": ["federation.method=fra", "federation.method_options.fold_tail=true"],
    "fra_ffa": ["federation.method=fra", "federation.method_options.fold_tail=true",
                "federation.method_options.ffa_after=2"],
    "hexa": ["federation.method=hexa"],
}
EPSILONS = [None, 8.0, 3.0, 1.0]
OUT = ROOT / "runs" / "privacy"


def _label(eps) -> str:
    return "eps_none" if eps is None else f"eps{eps:g}"


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("FEDLORA_DATA_DIR", str(ROOT.parent / "shared" / "data" / "glue"))
    return env


def run_one(method: str, eps, rounds: int) -> float:
    out = OUT / _label(eps) / method
    if len(_records(out)) >= rounds:
        return 0.0
    fedlora = str(ROOT / ".venv" / "bin" / "fedlora")
    if (out / "checkpoints").is_dir():
        cmd = [fedlora, "run", "--resume", str(out)]
    else:
        privacy = [] if eps is None else [f"privacy.target_epsilon={eps}"]
        cmd = [fedlora, "run", RECIPE, *METHODS[method], *privacy, f"output_dir={out}", "--overwrite"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, env=_env())
    return time.perf_counter() - t0


def table(rounds: int) -> dict:
    rows = {}
    for method in METHODS:
        for eps in EPSILONS:
            records = _records(OUT / _label(eps) / method)
            if len(records) >= rounds:
                last = records[-1]
                rows.setdefault(method, {})[_label(eps)] = {
                    "final": last["metric"], "best": max(r["metric"] for r in records),
                    "epsilon_spent_max": last.get("epsilon_max"), "delta": last.get("dp_delta"),
                    "wall_s": last.get("wall_time_s"),
                }
    return rows


def write(rows: dict, wall: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = ROOT / "benchmarks" / "results" / "privacy.json"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"rows": rows, "wall_s_this_invocation": wall}, indent=1))
    cols = [_label(e) for e in EPSILONS]
    lines = ["| method | " + " | ".join("no DP" if c == "eps_none" else f"eps = {c[3:]}" for c in cols) + " |",
             "| --- |" + " ---: |" * len(cols)]
    for method, row in rows.items():
        cells = []
        for c in cols:
            cell = row.get(c)
            cells.append("-" if cell is None else f"{cell['final']:.4f} ({cell['best']:.4f})")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    (ROOT / "docs" / "privacy_table.md").write_text(
        "Final (best) SST-2 dev accuracy after 5 rounds; `python benchmarks/privacy.py --table-only`\n\n"
        + "\n".join(lines) + "\n")
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key in zip(axes, ("final", "best")):
        for i, (method, row) in enumerate(rows.items()):
            color = f"C{i}"
            pts = [(e, row[_label(e)][key]) for e in EPSILONS if e is not None and _label(e) in row]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", color=color, label=method)
            if "eps_none" in row:
                ax.axhline(row["eps_none"][key], linestyle=":", linewidth=1.0, color=color)
        ax.set_xscale("log")
        ax.set_xticks([e for e in EPSILONS if e is not None], [f"{e:g}" for e in EPSILONS if e is not None])
        ax.minorticks_off()
        ax.set_xlabel("target epsilon per client (dotted: same method without DP)")
        ax.set_title(f"{key} SST-2 dev accuracy over 5 rounds")
    axes[0].set_ylabel("accuracy")
    axes[0].legend()
    fig.tight_layout()
    (ROOT / "docs" / "figures").mkdir(parents=True, exist_ok=True)
    fig.savefig(ROOT / "docs" / "figures" / "privacy_metric_vs_epsilon.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--rounds", type=int, default=5)
    opts = parser.parse_args()
    wall = 0.0
    if not opts.table_only:
        for eps in EPSILONS:  # no DP first: the reference every epsilon is read against
            for method in METHODS:
                wall += run_one(method, eps, opts.rounds)
                write(table(opts.rounds), wall)
    rows = table(opts.rounds)
    saved = ROOT / "benchmarks" / "results" / "privacy.json"
    if opts.table_only and not rows and saved.exists():  # the runs are gone (a fresh clone): redraw from the results
        previous = json.loads(saved.read_text())
        rows, wall = previous["rows"], previous["wall_s_this_invocation"]
    write(rows, wall)
    print((ROOT / "docs" / "privacy_table.md").read_text())
    print(f"wall time of this invocation: {wall / 60:.1f} min")


if __name__ == "__main__":
    main()
