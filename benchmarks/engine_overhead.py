"""Engine overhead: the in-process engine against a plain PEFT training loop doing the same local steps.

    python benchmarks/engine_overhead.py [--quick] [--out benchmarks/results/engine_overhead.json]

Two measurements, each side in its own fresh subprocess so that peak memory (``ru_maxrss``) belongs to
that side alone; ratios come from the same invocation, side by side (CPU timings here are noisy):

1. Time and peak memory of one federated round (K clients x S local steps, AdamW, batch B) through
   ``Simulation.run_round`` against a hand-written PEFT loop over the very same batches (same model, same
   LoRA config, fresh AdamW per client). The engine's extra work is swapping adapters in and out,
   aggregation and folding; its dev evaluation is cut to one batch and local evaluation is off. Target
   ratio <= 1.05.
2. Peak memory of the engine with 1,000 simulated clients against 10 (the same 10 trained per round).
   Memory should grow with the clients' adapters and bookkeeping, not with copies of the model. Target
   <= 1.3x.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = os.environ.get("FEDLORA_DATA_DIR", str(ROOT.parent / "shared" / "data" / "glue"))


def engine_config(num_clients: int, per_round: int, steps: int, batch: int, out: str, method: str = "fedex"):
    from fedlora.config import load_config

    return load_config(None, [
        f"data.data_dir={DATA_DIR}", "data.task=sst2", "data.max_train_examples=20000", "data.max_eval_examples=16",
        f"partition.num_clients={num_clients}", "partition.scheme=iid",
        f"federation.clients_per_round={per_round}", "federation.rounds=1", f"federation.method={method}",
        f"train.local_steps={steps}", f"train.batch_size={batch}", "eval.local=false", "eval.batch_size=64",
        f"output_dir={out}",
    ])


def child_engine(args) -> dict:
    from fedlora.sim.engine import Simulation

    cfg = engine_config(args.clients, args.per_round, args.steps, args.batch, args.workdir)
    sim = Simulation(cfg)
    base_rss = _maxrss_mb()
    t0 = time.perf_counter()
    sim.run_round(0)
    return {"seconds": time.perf_counter() - t0, "maxrss_mb": _maxrss_mb(), "rss_after_setup_mb": base_rss}


def plain_round(sim) -> None:
    """The engine's round-0 clients, batches and optimizer settings, in a bare PEFT loop."""
    import torch

    from fedlora.sim.client import batch_at, local_batches
    from fedlora.sim.engine import _seed

    cfg, model, data = sim.cfg, sim.model, sim.data
    params = [p for p in model.parameters() if p.requires_grad]
    for cid in sim.sample_clients(0):
        torch.manual_seed(_seed(cfg.seed, 0, cid))
        optimizer = torch.optim.AdamW(params, lr=cfg.train.lr)
        model.train()
        for idx in local_batches(data.train_indices[cid], cfg.train.batch_size, cfg.train.local_steps,
                                 [cfg.seed, 0, int(cid), 1]):
            loss = model(**batch_at(data.train, idx)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()


def child_plain(args) -> dict:
    from fedlora.sim.engine import Simulation

    cfg = engine_config(args.clients, args.per_round, args.steps, args.batch, args.workdir)
    sim = Simulation(cfg)  # the same data and model set-up, then bypassed entirely
    base_rss = _maxrss_mb()
    t0 = time.perf_counter()
    plain_round(sim)
    return {"seconds": time.perf_counter() - t0, "maxrss_mb": _maxrss_mb(), "rss_after_setup_mb": base_rss}


def child_interleaved(args) -> dict:
    """Time both sides in one process, alternating, so machine load drifts over both alike."""
    from fedlora.sim.engine import Simulation

    cfg = engine_config(args.clients, args.per_round, args.steps, args.batch, args.workdir)
    sim = Simulation(cfg)
    plain_round(sim)  # warm-up (allocator, kernels)
    pairs = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        plain_round(sim)
        t1 = time.perf_counter()
        sim.run_round(0)
        t2 = time.perf_counter()
        pairs.append({"plain_s": t1 - t0, "engine_s": t2 - t1, "ratio": (t2 - t1) / (t1 - t0)})
    return {"pairs": pairs}


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _spawn(kind: str, clients: int, per_round: int, steps: int, batch: int, workdir: Path, repeats: int = 1) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--clients", str(clients), "--per-round", str(per_round),
           "--steps", str(steps), "--batch", str(batch), "--workdir", str(workdir), "--repeats", str(repeats)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer steps (smoke test)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "engine_overhead.json"))
    parser.add_argument("--child", choices=["engine", "plain", "interleaved"])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workdir", default="/tmp/fedlora-engine-bench")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.child:
        fn = {"engine": child_engine, "plain": child_plain, "interleaved": child_interleaved}[args.child]
        print(json.dumps(fn(args)))
        return

    from rich.console import Console
    from rich.table import Table

    steps = 3 if args.quick else args.steps
    work = Path(args.workdir)
    rows = {}
    # Time: both sides in one process, alternating; the median of the paired ratios.
    timed = _spawn("interleaved", 10, args.per_round, steps, args.batch, work / "timed",
                   1 if args.quick else args.repeats)
    ratios = sorted(p["ratio"] for p in timed["pairs"])
    plain_s = sorted(p["plain_s"] for p in timed["pairs"])[len(ratios) // 2]
    engine_s = sorted(p["engine_s"] for p in timed["pairs"])[len(ratios) // 2]
    # Peak memory: each side alone in a fresh process.
    plain = _spawn("plain", 10, args.per_round, steps, args.batch, work / "plain")
    engine = _spawn("engine", 10, args.per_round, steps, args.batch, work / "engine")
    rows["round_vs_plain_peft"] = {
        "pairs": timed["pairs"], "plain_alone": plain, "engine_alone": engine,
        "time_ratio": ratios[len(ratios) // 2],
        "peak_memory_ratio": engine["maxrss_mb"] / plain["maxrss_mb"],
    }
    many = _spawn("engine", 1000, args.per_round, steps, args.batch, work / "many")
    few = _spawn("engine", 10, args.per_round, steps, args.batch, work / "few")
    rows["clients_1000_vs_10"] = {"clients_10": few, "clients_1000": many,
                                  "peak_memory_ratio": many["maxrss_mb"] / few["maxrss_mb"]}

    table = Table(title=f"engine overhead: MiniLM, SST-2, {args.per_round} clients x {steps} steps "
                        f"x batch {args.batch}")
    for col in ("comparison", "reference", "engine", "ratio", "target"):
        table.add_column(col)
    r = rows["round_vs_plain_peft"]
    table.add_row("round time (median, interleaved)", f"{plain_s:.2f} s", f"{engine_s:.2f} s",
                  f"{r['time_ratio']:.3f}", "<= 1.05")
    table.add_row("peak RSS, round", f"{plain['maxrss_mb']:.0f} MB", f"{engine['maxrss_mb']:.0f} MB",
                  f"{r['peak_memory_ratio']:.3f}", "~1")
    m = rows["clients_1000_vs_10"]
    table.add_row("peak RSS, 1000 vs 10 clients", f"{few['maxrss_mb']:.0f} MB", f"{many['maxrss_mb']:.0f} MB",
                  f"{m['peak_memory_ratio']:.3f}", "<= 1.3")
    Console().print(table)
    import torch

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": steps, "per_round": args.per_round, "batch": args.batch,
                               "torch": torch.__version__, "threads": torch.get_num_threads(), **rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
