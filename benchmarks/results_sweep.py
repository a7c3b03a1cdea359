"""The issue-11 results protocol: choose each method's learning rate on a validation split, then sweep.

    FEDLORA_DATA_DIR=../shared/data .venv/bin/python benchmarks/results_sweep.py            # all (resumable)
    .venv/bin/python benchmarks/results_sweep.py --phase lr                                   # only step 1
    .venv/bin/python benchmarks/results_sweep.py --tasks sst2                                 # step 2 for one task
    .venv/bin/python benchmarks/results_sweep.py --tasks cola_long --workers 2                # two processes a sweep

1. **Learning rate per method** (``recipes/sweeps/results_lr.yaml``): SST-2, Dirichlet 0.5, seed 0, every
   method at 5e-4, 2e-3 and 5e-3, evaluated on 10 % of the training data held out from every client
   (``data.validation_fraction=0.1``; the dev set is never read). A method's rate is the one with the best
   mean validation metric over the last three rounds; ``benchmarks/results/lr_choice.json``.
   CoLA has its own step 1 and setting (``recipes/sweeps/results_lr_cola_long.yaml``: LoRA on every attention
   and MLP layer, 64 rounds with the rate decayed linearly, peak rates 1e-3 and 2e-3 on CoLA's held-out 10 %;
   ``lr_choice_cola_long.json``), because it does not learn in the base one or in 32 rounds.
2. **The sweep** per task (``sst2``, ``cola_long``, ``agnews``): the ten methods at their rates x IID,
   Dirichlet 0.5, Dirichlet 0.1 and FRA's class-imbalanced split x seeds 0, 1, 2, on the dev set;
   ``benchmarks/results/sweeps/<task>`` with its ``report.md``, and the generated sweep file beside it. The
   cells' records are committed as they finish (checkpoints stay local), so a later session resumes there.
3. **The claims** (``benchmarks/results_claims.py``): each seed paper's claim as a comparison over the cells,
   with a verdict (held, did not hold, within noise), in ``docs/results_claims.md``.

The base run (``recipes/configs/results/minilm_base.yaml``): MiniLM, LoRA rank 8, 10 clients, 3 per round,
8 rounds of 8 local steps at batch 16; the centralized ceiling takes 24 steps a round on all the data.
Everything resumes where it stopped: finished cells are skipped, a killed cell resumes from its checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import yaml

from fedlora.sweep import parse_method

ROOT = Path(__file__).resolve().parents[1]
BASE = "recipes/configs/results/minilm_base.yaml"
OUT = ROOT / "benchmarks" / "results" / "sweeps"  # records committed, checkpoints ignored (.gitignore there)
RATE_STEPS = {  # step 1 per setting: its sweep file, and where the chosen rates are written
    "base": (ROOT / "recipes" / "sweeps" / "results_lr.yaml",
             ROOT / "benchmarks" / "results" / "lr_choice.json"),
    "cola_long": (ROOT / "recipes" / "sweeps" / "results_lr_cola_long.yaml",
                  ROOT / "benchmarks" / "results" / "lr_choice_cola_long.json"),
}
TASKS = {  # task folder -> its overrides of the base run, and the step 1 its rates come from
    "sst2": (["data.task=sst2"], "base"),
    # CoLA leaves the majority class only with every attention and MLP layer and about 30 federated rounds
    # (docs/results.md). Its earlier settings stay as records: the base one (sweeps/cola, 26 cells) and 32
    # rounds at a constant rate (sweeps/lr_select_cola, step 1 stopped at 22 of 30 runs).
    "cola_long": (["data.task=cola", "lora.target_modules=[attention, mlp]", "federation.rounds=64",
                   "train.lr_schedule=linear"], "cola_long"),
    "agnews": (["data.task=agnews"], "base"),
}
PARTITIONS = {
    "iid": ["partition.scheme=iid"],
    "dir0.5": ["partition.scheme=dirichlet", "partition.options.alpha=0.5"],
    "dir0.1": ["partition.scheme=dirichlet", "partition.options.alpha=0.1", "partition.options.min_partition_size=10"],
    "imbalanced": ["partition.scheme=imbalanced", "partition.options.dominant_fraction=0.9"],
}


def _env() -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.setdefault("FEDLORA_DATA_DIR", str(ROOT.parent / "shared" / "data"))
    return env


def _data_dir(task: str) -> str:
    """GLUE tasks live in ``data/glue``, AG News in ``data/agnews``: the folder each task is read from."""
    root = Path(_env()["FEDLORA_DATA_DIR"])
    root = root.parent if root.name == "glue" else root
    return str(root / ("agnews" if task == "agnews" else "glue"))


def _sweep(spec: Path, data_dir: str, workers: int) -> None:
    subprocess.run([str(ROOT / ".venv" / "bin" / "fedlora"), "sweep", str(spec), "--data-dir", data_dir,
                    "--workers", str(workers)], check=True, cwd=ROOT, env=_env())


def _finished(out: Path) -> bool:
    """Whether every cell of the sweep in ``out`` is done (a partial sweep would compare one seed)."""
    manifest = out / "sweep.json"
    return manifest.is_file() and all(c["status"] == "done"
                                      for c in json.loads(manifest.read_text())["cells"])


def _cells(out: Path) -> list[dict]:
    manifest = json.loads((out / "sweep.json").read_text())
    for cell in manifest["cells"]:
        path = out / cell["dir"] / "metrics.jsonl"
        cell["records"] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
            if path.exists() else []
    return manifest["cells"]


def choose_rates(setting: str) -> dict[str, float] | None:
    """Each method's rate from a finished step 1 (``None`` while it is not finished)."""
    lr_sweep, choice_file = RATE_STEPS[setting]
    spec = yaml.safe_load(lr_sweep.read_text())
    out = ROOT / spec["out"]
    if not _finished(out):
        return None
    scores: dict[str, dict[float, float]] = {}
    for cell in _cells(out):
        last = [r["metric"] for r in cell["records"][-3:]]
        scores.setdefault(cell["keys"]["method"], {})[cell["keys"]["lr"]] = sum(last) / len(last)
    # a tie (CoLA: several rates still at the majority class) goes to the lowest rate
    choice = {m: max(sorted(by_lr), key=by_lr.get) for m, by_lr in scores.items()}
    choice_file.parent.mkdir(parents=True, exist_ok=True)
    choice_file.write_text(json.dumps({"chosen": choice, "validation_last3_mean": scores}, indent=1) + "\n")
    return choice


def main_spec(task: str, choice: dict[str, float]) -> Path:
    overrides, setting = TASKS[task]
    lr_sweep, choice_file = RATE_STEPS[setting]
    items = []
    for item in yaml.safe_load(lr_sweep.read_text())["methods"]:
        label = parse_method(item).label  # the sweep's own reading of `label=name:options`
        items.append({"label": label, "method": item.removeprefix(f"{label}="),
                      "overrides": [f"train.lr={choice[label]}"]})
    spec = {"config": BASE, "overrides": overrides, "out": f"benchmarks/results/sweeps/{task}",
            "methods": items, "partitions": PARTITIONS, "seeds": [0, 1, 2]}
    path = OUT / f"{task}.yaml"
    OUT.mkdir(parents=True, exist_ok=True)
    header = f"# generated by benchmarks/results_sweep.py (rates: {choice_file.name})\n"
    path.write_text(header + yaml.safe_dump(spec))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=["all", "lr", "sweep"], default="all")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--workers", type=int, default=1, help="processes per sweep (fedlora sweep --workers)")
    opts = parser.parse_args()
    t0 = time.perf_counter()
    tasks = opts.tasks.split(",")
    unknown = sorted(set(tasks) - set(TASKS))
    if unknown:
        parser.error(f"unknown task(s) {', '.join(unknown)}; expected some of {', '.join(TASKS)}")
    settings = list(dict.fromkeys(TASKS[t][1] for t in tasks))
    if opts.phase in ("all", "lr"):
        for setting in settings:
            lr_sweep = RATE_STEPS[setting][0]
            task = next(o.split("=", 1)[1] for o in yaml.safe_load(lr_sweep.read_text())["overrides"]
                        if o.startswith("data.task="))  # the task step 1 reads, not the tasks swept
            _sweep(lr_sweep, _data_dir(task), opts.workers)
    if opts.phase in ("all", "sweep"):
        for task in tasks:
            choice = choose_rates(TASKS[task][1])
            if choice is None:
                print(f"{task}: step 1 ({RATE_STEPS[TASKS[task][1]][0].name}) is not finished: --phase lr")
                continue
            print(f"{task}: learning rates {choice}", flush=True)
            _sweep(main_spec(task, choice), _data_dir(task), opts.workers)
        measured = [str(OUT / t) for t in TASKS if _finished(OUT / t)]  # every finished task, not only these
        subprocess.run([str(ROOT / ".venv" / "bin" / "python"), str(ROOT / "benchmarks" / "results_claims.py"),
                        *measured, "--out", str(ROOT / "docs" / "results_claims.md")],
                       check=True, cwd=ROOT)
    print(f"wall time of this invocation: {(time.perf_counter() - t0) / 3600:.2f} h")


if __name__ == "__main__":
    main()
