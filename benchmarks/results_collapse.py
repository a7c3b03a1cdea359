"""Why skewed SST-2 cells end at the majority class: the round's model predicts its heaviest client's class.

    .venv/bin/python benchmarks/results_collapse.py benchmarks/results/sweeps/sst2 \
        --data-dir ../shared/data/glue

For every finished cell of a skewed partition (Dirichlet 0.5, 0.1, class-imbalanced) and every round whose dev
accuracy equals the share of one class in that seed's dev subset (the model predicts that class for every
example), compare the predicted class with the dominant label of the client that carried the largest
aggregation weight that round (``weights`` in the record; labels from the cell's ``label_histograms.json``).
Prints, per method, how many rounds collapsed to one class and in how many of those the class was the
heaviest client's. Reads records only; trains nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from fedlora.data.loading import load_source  # noqa: E402
from fedlora.report_dir import load_folder  # noqa: E402

SKEWED = ("dir0.5", "dir0.1", "imbalanced")


def class_shares(data_dir: str, task: str, seed: int, max_examples: int) -> list[float]:
    """Share of each label in the seeded dev subset the sweep's cells were scored on."""
    dev = load_source(task, "dev", data_dir, max_examples, seed)
    counts = Counter(int(y) for y in dev.labels)
    return [counts.get(c, 0) / len(dev.labels) for c in range(max(counts) + 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder")
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--max-eval-examples", type=int, default=500)
    opts = parser.parse_args()
    shares: dict[int, list[float]] = {}
    rows: dict[str, Counter] = {}
    for cell in load_folder(Path(opts.folder)):  # the sweep's done cells
        keys = cell.keys
        if keys.get("partition") not in SKEWED or keys.get("method") == "centralized":
            continue
        seed = int(keys["seed"])
        if seed not in shares:
            shares[seed] = class_shares(opts.data_dir, opts.task, seed, opts.max_eval_examples)
        hist = json.loads((cell.path / "label_histograms.json").read_text())["counts"]
        dominant = [max(range(len(c)), key=c.__getitem__) for c in hist]
        tally = rows.setdefault(str(keys["method"]), Counter())
        for r in cell.records:
            heaviest = max(r["weights"], key=r["weights"].get)
            named = heaviest.isdigit()  # HierFedLoRA weighs groups, not clients: no heaviest client to name
            tally["rounds"] += 1
            tally["named"] += named
            predicted = [c for c, s in enumerate(shares[seed]) if abs(r["metric"] - s) < 1e-9]
            if len(predicted) != 1:
                continue
            tally["one class"] += 1
            if named:
                tally["heaviest"] += int(dominant[int(heaviest)] == predicted[0])
    print("| method | rounds | predicting one class | of which the heaviest client's class |")
    print("| --- | ---: | ---: | ---: |")
    for method, t in rows.items():
        share = f"{t['heaviest']}" if t["named"] else "- (group weights)"
        print(f"| {method} | {t['rounds']} | {t['one class']} | {share} |")
    print(f"\ndev class shares by seed: { {s: [round(x, 3) for x in v] for s, v in sorted(shares.items())} }")


if __name__ == "__main__":
    main()
