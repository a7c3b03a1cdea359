"""Flower simulation against the in-process engine: round time as a ratio, and bytes on the wire.

    .venv/bin/python benchmarks/flower_overhead.py                      # the default experiment (`make run`)
    .venv/bin/python benchmarks/flower_overhead.py [CONFIG] [key=value ...] [--out PATH]

Runs one experiment twice in this one invocation, one after the other on the same machine: in-process
(``fedlora.sim.engine.Simulation``, as ``fedlora run``) and on Flower's simulation runtime
(``fedlora run --engine flower``: a local SuperLink, the ServerApp and simulated SuperNodes). Both write their
usual run folders under ``--work`` (default ``runs/bench_flower``).

Time. Each round's ``round_time_s`` is measured by the engine around the whole round (sampling, tasks,
the exchange, aggregation, fold, evaluation), the same code in both runs; on Flower the exchange goes
through the SuperLink to the nodes and back. Reported: the ratio of mean round times (Flower / in-process)
over rounds 2..R (round 1 on Flower also builds each node's data and model copy in the simulation's worker,
reported apart), and the ratio of whole-run wall times including Flower's start-up (SuperLink, Ray).

Bytes. For every round: the tensor payload bytes measured from the Flower messages themselves (the arrays
of each task and reply, ``wire_tensor_bytes``) against what the strategy computes (``bytes_down +
bytes_up``); they must be equal. Header bytes (fedlora's JSON headers, array names, ``.npy`` headers) are
reported beside them; Flower's own framing is not counted.

Timings on a shared machine are noisy: only the ratio from one run is claimed, never seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("args", nargs="*", help="[CONFIG.yaml] [key.path=value ...] (default: the default run)")
    parser.add_argument("--work", default="runs/bench_flower", help="folder of the two runs")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/flower_overhead.json"))
    opts = parser.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from fedlora.cli import _split_args
    from fedlora.config import load_config
    from fedlora.sim.engine import Simulation

    work = Path(opts.work)
    shutil.rmtree(work, ignore_errors=True)
    config, overrides = _split_args(opts.args)

    inproc_dir = work / "inprocess"
    cfg = load_config(config, [*overrides, f"output_dir={inproc_dir}"])
    t0 = time.perf_counter()
    inproc = Simulation(cfg).run()
    inproc_wall = time.perf_counter() - t0

    flower_dir = work / "flower"
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedlora.cli", "run", *opts.args, f"output_dir={flower_dir}",
                           "--engine", "flower"], env=env, capture_output=True, text=True)
    flower_wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.exit(f"the Flower run failed: {done.stderr.strip().splitlines()[-1] if done.stderr.strip() else ''}")
    flower = _records(flower_dir)

    rounds = []
    for a, b in zip(inproc, flower):
        strategy = b["bytes_up"] + b["bytes_down"]
        rounds.append({
            "round": a["round"], "inprocess_s": a["round_time_s"], "flower_s": b["round_time_s"],
            "ratio": b["round_time_s"] / a["round_time_s"],
            "strategy_tensor_bytes": strategy, "wire_tensor_bytes": b.get("wire_tensor_bytes"),
            "equal": b.get("wire_tensor_bytes") == strategy, "header_bytes": b.get("header_bytes"),
            "metric_inprocess": a["metric"], "metric_flower": b["metric"],
        })
    warm = rounds[1:] or rounds
    result = {
        "command": "python benchmarks/flower_overhead.py " + " ".join(opts.args),
        "rounds": rounds,
        "round_time_ratio_warm": statistics.mean(r["flower_s"] for r in warm)
        / statistics.mean(r["inprocess_s"] for r in warm),
        "round_time_ratio_first": rounds[0]["ratio"],
        "wall_ratio": flower_wall / inproc_wall,
        "bytes_equal_every_round": all(r["equal"] for r in rounds),
        "max_metric_difference": max(abs(r["metric_inprocess"] - r["metric_flower"]) for r in rounds),
        "config": {"method": cfg.federation.method, "model": cfg.model.name, "task": cfg.data.task,
                   "clients": cfg.partition.num_clients, "per_round": cfg.federation.clients_per_round,
                   "local_steps": cfg.train.local_steps, "rounds": cfg.federation.rounds},
    }
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=1))
    print(f"{'round':>5} {'in-process s':>12} {'Flower s':>9} {'ratio':>6} {'strategy B':>11} {'wire B':>11} "
          f"{'equal':>5} {'header B':>9}")
    for r in rounds:
        print(f"{r['round']:>5} {r['inprocess_s']:>12.2f} {r['flower_s']:>9.2f} {r['ratio']:>6.2f} "
              f"{r['strategy_tensor_bytes']:>11} {r['wire_tensor_bytes']!s:>11} {r['equal']!s:>5} "
              f"{r['header_bytes']!s:>9}")
    print(f"round time ratio (rounds 2..R): {result['round_time_ratio_warm']:.3f}; round 1: "
          f"{result['round_time_ratio_first']:.3f}; whole run incl. start-up: {result['wall_ratio']:.3f}")
    print(f"wire bytes equal to the strategy's every round: {result['bytes_equal_every_round']}; "
          f"largest metric difference: {result['max_metric_difference']:.2e}")
    print(f"written {opts.out}")


if __name__ == "__main__":
    main()
