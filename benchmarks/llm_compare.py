"""Issue 13's compare: FedIT, FFA-LoRA, FedEx, FRA and HEXA on the offline instruction task, one command.

    .venv/bin/python benchmarks/llm_compare.py

Builds the task, tokenizer and tiny GPT-2 (``python -m fedlora.data.synthetic runs/llm_demo``) unless they
exist, then runs ``fedlora compare`` on ``recipes/configs/llm/demo_tiny.yaml`` (10 clients, Dirichlet 0.5
over the five task kinds, 5 per round, 12 rounds of 20 steps, lr 1e-2, LoRA rank 8 on attention and MLP),
with one torch thread. The table and plots land in ``runs/llm_demo/compare`` and are copied to ``docs/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "runs" / "llm_demo"
OUT = DEMO / "compare"


def main() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    t0 = time.perf_counter()
    if not (DEMO / "model" / "model.safetensors").exists():
        subprocess.run([sys.executable, "-m", "fedlora.data.synthetic", str(DEMO)], check=True, env=env, cwd=ROOT)
    subprocess.run([str(ROOT / ".venv" / "bin" / "fedlora"), "compare", "--methods", "fedit,ffa,fedex,fra,hexa",
                    "recipes/configs/llm/demo_tiny.yaml", "--out", str(OUT), "--overwrite"],
                   check=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - t0
    rows = ["| method | exact match, round 1 | best | final | ROUGE-L final | perplexity final | MB exchanged |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method in ("fedit", "ffa", "fedex", "fra", "hexa"):
        records = [json.loads(line) for line in (OUT / method / "metrics.jsonl").read_text().splitlines()]
        em = [r["metrics"]["exact_match"] for r in records]
        mb = sum(r["bytes_up"] + r["bytes_down"] for r in records) / 1e6
        rows.append(f"| {method} | {em[0]:.2f} | {max(em):.2f} | {em[-1]:.2f} | "
                    f"{records[-1]['metrics']['rouge_l']:.2f} | {records[-1]['metric']:.2f} | {mb:.1f} |")
    table = "\n".join(rows) + f"\n\nWall time of the command here: {wall / 60:.1f} min.\n"
    (ROOT / "docs" / "llm_compare_table.md").write_text(table)
    figures = ROOT / "docs" / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    for png in OUT.glob("compare_*.png"):
        shutil.copy(png, figures / f"llm_{png.name}")
    plot_exact_match(figures / "llm_exact_match.png")
    print(table)


def plot_exact_match(path: Path) -> None:
    """Exact match per round, one line per method (the compare's own plots show perplexity)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.2))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for method in ("fedit", "ffa", "fedex", "fra", "hexa"):
        records = [json.loads(line) for line in (OUT / method / "metrics.jsonl").read_text().splitlines()]
        ax.plot([r["round"] for r in records], [r["metrics"]["exact_match"] for r in records], marker="o",
                label=method)
    ax.set_xlabel("round")
    ax.set_ylabel("exact match (greedy, 100 dev prompts)")
    ax.set_title("offline instruction task, tiny GPT-2, 10 clients, Dirichlet 0.5 by kind")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
