"""Factored aggregation vs a dense reference: speed, peak memory and agreement, in one run.

    .venv/bin/python benchmarks/aggregation.py            # full benchmark (a few minutes on 2 cores)
    .venv/bin/python benchmarks/aggregation.py --quick    # tiny smoke version (seconds)
    .venv/bin/python benchmarks/aggregation.py --out PATH # JSON path (default: benchmarks/results/)

What is measured
----------------
**Path**: the library picks the factored path, or the dense one when ``K r`` reaches
``lowrank.DENSE_FRACTION`` of ``min(d_out, d_in)`` (same results); the grid table says which each point took.

**Grid** (``d x d`` modules, ``d`` in {768, 2048, 4096}, ``K`` in {3, 10, 50} clients, LoRA rank ``r`` in
{8, 16}, float32, plus the ``11008 x 4096`` MLP shape of the model below at ``K=10, r=16``). Clients hold
``B_k = B0 + noise``, ``A_k = A0 + noise`` (a shared direction plus client drift, so the top-``r`` subspace is
well separated and the agreement numbers mean something), data sizes drawn at random. Three paths:

* ``aggregate``: the real library path, one FRA round with ``fold_tail=True`` through
  ``get_aggregator("fra", fold_tail=True).aggregate(...)`` on one module: validation, ``M`` as stacked
  factors, truncated SVD through the small core, the exact tail kept as factors, the aggregation error
  ``||ideal - applied|| / ||ideal - start||`` and the next payloads. On the dense path, ``M`` formed and only
  its top ``r`` triplets computed (``dense_svd.top_triplets``, falling back to the full SVD when the spectrum
  has no gap), the tail ``(L - U U^T L) R`` from the stacked factors.
* ``truncate``: the bare factored truncated SVD, ``lowrank.truncate(lowrank.concat(updates, p), r)``.
* ``dense``: the reference. ``M = sum_k p_k s B_k A_k`` formed as a ``d_out x d_in`` matrix (in-place
  ``addmm_``), ``torch.linalg.svd(M, full_matrices=False)``, the balanced rank-``r`` head and the dense tail
  ``M - head`` (what FRA with ``fold_tail`` folds into ``W``), in place on ``M``.

Speed ratio = dense time / factored time and memory ratio = dense peak / factored peak, measured in the same
process, one after the other, on the same inputs. Agreement: ``||H_dense - H||_F / ||H_dense||_F`` for the
rank-``r`` reconstructions ``H`` of ``truncate`` and of ``aggregate`` (``s B A`` of the new global adapter),
the largest singular-value difference relative to ``sigma_1``, and FRA's own aggregation error.

**Model**: a LLaMA-7B-shaped adapter, 32 layers of q, k, v, o (4096 x 4096), gate, up (11008 x 4096) and
down (4096 x 11008), 224 modules, ``K = 10`` clients, ``r = 16``, float32, one full ``aggregate`` round with
FRA (``fold_tail=True``) and with HEXA (default options), each in its own process. The dense path is not run
on the whole model (it would take ~an hour here); it is extrapolated from the measured dense time of one
``4096 x 4096`` and one ``11008 x 4096`` module (``K=10, r=16``; a ``4096 x 11008`` module counts as
``11008 x 4096``, the SVD of a transpose costing the same) times the module counts. A dense round done module
by module needs at most the largest single-module peak at once (the tails folded into ``W`` in place), so
that peak is the dense memory figure for the model.

Timing
------
``time.perf_counter`` around each call. The machine is small and shared, so no fixed seconds are claimed
as targets; ratios come from the same run, side by side. Small cases: median of several repeats after a
warm-up (the paths are interleaved, so load spikes hit both). Large cases: fewer repeats; the dense SVD at
``d = 4096`` (~15 s) and ``11008 x 4096`` (~25 s) runs once, and that one run gives both its time and its
memory. Every path first runs once on a tiny module, so one-time library initialisation (MKL, code paths)
is not charged to anybody. The load average before and after each measurement is recorded.

Peak memory (CPU: torch keeps no allocator statistics)
------------------------------------------------------
Each grid configuration runs in a fresh subprocess (``aggregation_worker.py``). After imports, input
creation and the warm-up, the kernel's resident-set high-water mark is reset (``echo 5 > /proc/self/clear_refs``, so
``VmHWM`` restarts at the current ``VmRSS``); one call of a path runs; its peak is ``VmHWM - VmRSS_before``.
That counts everything the call touches: torch tensors, LAPACK/MKL workspaces, Python objects. To keep one
path's freed memory from hiding the next path's allocations, the memory runs use glibc's
``mallopt(M_MMAP_THRESHOLD = 16 KiB)`` (every block of 16 KiB or more is a fresh ``mmap``, returned to the
system on free) and ``MKL_DISABLE_FAST_MM=1`` (MKL does not cache buffers); the order is truncate,
aggregate, dense. The timing repeats that follow switch the threshold to glibc's steady state (32 MiB), as
a long-running process would have. Blocks under 16 KiB may still come from already-resident heap, so the
smallest factored peaks are accurate to a few hundred KiB; they are never rounded down to zero for a ratio
(a floor of one page, 4 KiB, and the table marks such ratios as lower bounds with ``>``). If ``clear_refs``
is not writable the fallback is ``ru_maxrss`` after minus before (the same high-water mark, not reset;
recorded in the JSON as ``memory_method``). The model rounds run with the default allocator (their blocks
are MB-sized) in separate processes, one method each, and report the same ``VmHWM`` difference.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from aggregation_worker import MIB, PAGE, _loadavg, _model_shapes  # the measuring side, beside this file

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "aggregation.json"

FULL_GRID = {"d": [768, 2048, 4096], "K": [3, 10, 50], "r": [8, 16]}
QUICK_GRID = {"d": [128, 256], "K": [3, 10], "r": [8]}
FULL_MODEL = {"layers": 32, "hidden": 4096, "intermediate": 11008, "K": 10, "r": 16}
QUICK_MODEL = {"layers": 2, "hidden": 128, "intermediate": 344, "K": 10, "r": 16}
TARGET_SPEEDUP = 100.0  # at d = 4096, K = 10 (both r)
TARGET_MODEL_SECONDS = 8.0  # the LLaMA-7B-shaped round, FRA fold and HEXA (issue 12)
TARGET_GRID_RATIO = 0.95  # no grid point below this fraction of dense, in speed or memory (noise allowance)


# =============================================================================== driver side

def _run_worker(kind: str, task: dict, timeout: float | None = None) -> dict:
    env = dict(os.environ, MKL_DISABLE_FAST_MM="1", PYTHONPATH=str(ROOT / "src") + os.pathsep
               + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, str(Path(__file__).resolve().with_name("aggregation_worker.py")), kind, json.dumps(task)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        return {"error": f"worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}", "task": task,
                "worker_wall_s": wall}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["worker_wall_s"] = wall
    return out


def _reps(d_max: int, quick: bool) -> tuple[int, int]:
    """(factored repeats, dense repeats); dense 0 means its single memory run is also its timing."""
    if quick:
        return 3, 1
    if d_max <= 1024:
        return 7, 5
    if d_max <= 2048:
        return 5, 3
    return 3, 0


def _fmt_ms(s: float | None) -> str:
    if s is None or not math.isfinite(s):
        return "-"
    ms = s * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.2f}" if ms < 10 else f"{ms:.1f}"


def _fmt_s(s: float) -> str:
    return "-" if not math.isfinite(s) else f"{s:,.0f}" if s >= 100 else f"{s:.1f}" if s >= 1 else f"{s:.3f}"


def _fmt_mib(b: float | None) -> str:
    if b is None:
        return "-"
    return f"{b / MIB:,.1f}" if b >= 0.1 * MIB else f"{b / MIB:.2f}"


def _ratio(num: float, den: float, floor: float = 0.0) -> tuple[float, bool]:
    """``num / max(den, floor)``; the flag says the floor was used (the ratio is a lower bound)."""
    bound = den < floor
    return num / max(den, floor, 1e-300), bound


def _fmt_ratio(value: float, lower_bound: bool = False) -> str:
    if not math.isfinite(value):
        return "-"
    text = f"{value:,.0f}" if value >= 100 else f"{value:.1f}"
    return (">" if lower_bound else "") + text + "x"


def _summarise_config(res: dict) -> dict:
    t, m = res["time_s"], res["peak_bytes"]
    s_agg, _ = _ratio(t["dense"], t["aggregate"])
    s_tr, _ = _ratio(t["dense"], t["truncate"])
    m_agg, lb_agg = _ratio(m["dense"], m["aggregate"], PAGE)
    m_tr, lb_tr = _ratio(m["dense"], m["truncate"], PAGE)
    s_ex, _ = _ratio(t["dense"], t["exact"])
    m_ex, lb_ex = _ratio(m["dense"], m["exact"], PAGE)
    res["ratios"] = {
        "speed_dense_over_aggregate": s_agg, "speed_dense_over_truncate": s_tr, "speed_dense_over_exact": s_ex,
        "memory_dense_over_aggregate": m_agg, "memory_dense_over_truncate": m_tr, "memory_dense_over_exact": m_ex,
        "memory_ratio_is_lower_bound": {"aggregate": lb_agg, "truncate": lb_tr, "exact": lb_ex},
    }
    return res


def _grid_table(rows: list[dict]):
    from rich.table import Table

    table = Table(title="Factored (FRA fold_tail aggregate, error from the core / the same, exact error / bare "
                        "truncated SVD) vs dense reference, float32", show_lines=False)
    for col, just in [("d_out x d_in", "right"), ("K", "right"), ("r", "right"), ("path", "left"),
                      ("aggregate ms", "right"), ("exact ms", "right"), ("truncate ms", "right"),
                      ("dense ms", "right"), ("speed agg", "right"), ("speed exact", "right"),
                      ("speed svd", "right"), ("peak agg MiB", "right"), ("peak dense MiB", "right"),
                      ("mem agg", "right"), ("mem exact", "right"), ("mem svd", "right"),
                      ("rel diff", "right"), ("FRA err", "right"), ("exact err", "right")]:
        table.add_column(col, justify=just)
    for res in rows:
        if "error" in res:
            t = res["task"]
            table.add_row(f"{t['d_out']}x{t['d_in']}", str(t["K"]), str(t["r"]), "-", "[red]failed[/red]",
                          *["-"] * 14)
            continue
        t, m, q, a = res["time_s"], res["peak_bytes"], res["ratios"], res["agreement"]
        lb = q["memory_ratio_is_lower_bound"]
        rel = max(a["head_rel_diff_truncate"], a["head_rel_diff_aggregate"])
        table.add_row(
            f"{res['d_out']}x{res['d_in']}", str(res["K"]), str(res["r"]), res.get("path", "?"),
            _fmt_ms(t["aggregate"]), _fmt_ms(t["exact"]), _fmt_ms(t["truncate"]), _fmt_ms(t["dense"]),
            _fmt_ratio(q["speed_dense_over_aggregate"]), _fmt_ratio(q["speed_dense_over_exact"]),
            _fmt_ratio(q["speed_dense_over_truncate"]),
            _fmt_mib(m["aggregate"]), _fmt_mib(m["dense"]),
            _fmt_ratio(q["memory_dense_over_aggregate"], lb["aggregate"]),
            _fmt_ratio(q["memory_dense_over_exact"], lb["exact"]),
            _fmt_ratio(q["memory_dense_over_truncate"], lb["truncate"]),
            f"{rel:.1e}", f"{a['fra_aggregation_error']:.1e}", f"{a['fra_aggregation_error_exact']:.1e}",
        )
    return table


PARTS = ("validate", "weights", "combine", "error", "payloads", "bytes")


def _model_table(model: dict):
    from rich.table import Table

    cfg = model["config"]
    h, i = cfg["hidden"], cfg["intermediate"]
    table = Table(title=(f"Full model round: {cfg['layers']} layers x (q,k,v,o {h}x{h}; gate,up {i}x{h}; "
                         f"down {h}x{i}) = {model['modules']} modules, K={cfg['K']}, r={cfg['r']}, float32; "
                         "parts in seconds"))
    for col in ("method", "error measure", "round s", *PARTS, "bare SVDs s", "x bare", "dense extrap. s",
                "speed", "peak MiB", "mem: in place", "same outputs", "agg. error", f"< {TARGET_MODEL_SECONDS:.0f} s"):
        table.add_column(col, justify="right")
    dense = model["dense_extrapolated"]
    for key, res in model["methods"].items():
        if "error" in res:
            table.add_row(key, "-", "[red]failed[/red]", *["-"] * 15)
            continue
        ok = res["seconds"] < TARGET_MODEL_SECONDS
        table.add_row(
            res["method"], res["error_measure"], f"{res['seconds']:.1f}",
            *[f"{res['parts_s'].get(part, 0.0):.2f}" for part in PARTS],
            f"{res['truncate_s']:.1f}", f"{res['over_truncate']:.2f}", _fmt_s(dense["seconds"]),
            _fmt_ratio(res["speed_ratio"]), _fmt_mib(res["peak_bytes"]),
            _fmt_ratio(res["memory_ratio"]), _fmt_ratio(res["memory_ratio_same_outputs"]),
            f"{res['aggregation_error']:.1e}", "[green]yes[/green]" if ok else "[red]no[/red]",
        )
    return table


def _finite(obj):
    """JSON without NaN/Infinity: non-finite floats become null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def run(args) -> dict:
    from rich.console import Console

    console = Console(width=max(Console().width, 170))
    started = time.perf_counter()
    grid = QUICK_GRID if args.quick else FULL_GRID
    model_cfg = dict(QUICK_MODEL if args.quick else FULL_MODEL)
    meta = {
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick, "python": platform.python_version(), "platform": platform.platform(),
        "cpu_count": os.cpu_count(), "loadavg_1min_start": _loadavg(),
        "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "dtype": "float32",
    }

    # ---- grid, plus the model's non-square shapes (dense extrapolation needs them)
    tasks = [{"d_out": d, "d_in": d, "K": K, "r": r} for d in grid["d"] for K in grid["K"] for r in grid["r"]]
    h, i = model_cfg["hidden"], model_cfg["intermediate"]
    extra_shapes = {(h, h), (i, h)}  # (h, i) counts as (i, h)
    for shape in sorted(extra_shapes):
        wanted = (*shape, model_cfg["K"], model_cfg["r"])
        if not any((t["d_out"], t["d_in"], t["K"], t["r"]) == wanted for t in tasks):
            tasks.append({"d_out": shape[0], "d_in": shape[1], "K": model_cfg["K"], "r": model_cfg["r"],
                          "label": "model shape"})
    results = []
    for n, task in enumerate(tasks, 1):
        reps_f, reps_d = _reps(max(task["d_out"], task["d_in"]), args.quick)
        task.update(seed=1000 + n, reps_factored=reps_f, reps_dense=reps_d)
        console.print(f"[dim]\\[{n}/{len(tasks)}] {task['d_out']}x{task['d_in']} K={task['K']} r={task['r']} "
                      f"(repeats: factored {reps_f}, dense {max(reps_d, 1)}) ...[/dim]", highlight=False)
        res = _run_worker("config", task)
        results.append(_summarise_config(res) if "error" not in res else res)
        if "error" in res:
            console.print(f"[red]{res['error']}[/red]")

    # ---- full model
    def dense_for(shape):
        key = tuple(sorted(shape, reverse=True))
        for res in results:
            if "error" not in res and (res["d_out"], res["d_in"]) == key and \
                    (res["K"], res["r"]) == (model_cfg["K"], model_cfg["r"]):
                return res
        return None

    shapes = _model_shapes(model_cfg["layers"], h, i)
    counts: dict[tuple[int, int], int] = {}
    for shape in shapes.values():
        key = tuple(sorted(shape, reverse=True))
        counts[key] = counts.get(key, 0) + 1
    dense_parts = {}
    for k, c in counts.items():
        measured = dense_for(k) or {}
        dense_parts[f"{k[0]}x{k[1]}"] = {"count": c,
                                         "seconds_each": measured.get("time_s", {}).get("dense"),
                                         "peak_bytes_each": measured.get("peak_bytes", {}).get("dense")}
    have = all(p["seconds_each"] is not None for p in dense_parts.values())
    dense_extrap = {
        "seconds": (sum(p["count"] * p["seconds_each"] for p in dense_parts.values())
                    if have else float("nan")),
        "peak_bytes": max(p["peak_bytes_each"] for p in dense_parts.values()) if have else None,
        "parts": dense_parts,
        "how": "sum over module shapes of (count x measured dense time of one module, K and r as the model); "
               "peak_bytes = largest single-module dense peak (modules done one at a time, each dense tail "
               "folded into W in place as soon as it exists); peak_bytes_same_outputs = that plus the dense "
               "tails of all other modules held at once, as aggregate() holds its corrections (as factors)",
    }
    if have:
        tail_bytes = [4 * a * b for a, b in shapes.values()]
        held = sum(tail_bytes) - max(tail_bytes)
        dense_extrap["peak_bytes_same_outputs"] = dense_extrap["peak_bytes"] + held
    methods = {"fra": {"fold_tail": True}, "hexa": {}}
    model = {"config": model_cfg, "modules": len(shapes), "dense_extrapolated": dense_extrap, "methods": {}}
    if not args.no_model:
        for (name, options), measure in [(m, e) for m in methods.items() for e in ("core", "exact")]:
            console.print(f"[dim]model round: {name} {options}, error {measure}, over {len(shapes)} modules "
                          "...[/dim]", highlight=False)
            task = dict(model_cfg, method=name, options=options, seed=7, profile=args.profile, error_measure=measure,
                        cold=args.cold)
            res = _run_worker("model", task)
            if "error" not in res:
                res["speed_ratio"] = dense_extrap["seconds"] / res["seconds"]
                have_mem = dense_extrap["peak_bytes"] is not None
                res["memory_ratio"] = (dense_extrap["peak_bytes"] / max(res["peak_bytes"], PAGE)
                                       if have_mem else float("nan"))
                res["memory_ratio_same_outputs"] = (
                    dense_extrap["peak_bytes_same_outputs"] / max(res["peak_bytes"], PAGE)
                    if have_mem else float("nan"))
            else:
                console.print(f"[red]{res['error']}[/red]")
            model["methods"][f"{name}/{measure}"] = res

    # ---- targets
    ok_rows = [r for r in results if "error" not in r]
    big = [r for r in ok_rows if r["d_out"] == r["d_in"] == 4096 and r["K"] == 10]
    targets = {
        "speedup_at_d4096_K10": {
            "target": f">= {TARGET_SPEEDUP:.0f}x (library aggregate path, each r)",
            "values": {f"r={r['r']}": {"aggregate": r["ratios"]["speed_dense_over_aggregate"],
                                        "truncate": r["ratios"]["speed_dense_over_truncate"]} for r in big},
            "met": bool(big)
            and all(r["ratios"]["speed_dense_over_aggregate"] >= TARGET_SPEEDUP for r in big),
        } if not args.quick else {"target": "n/a in --quick"},
        "model_round_seconds": {
            "target": f"< {TARGET_MODEL_SECONDS:.0f} s per round, FRA fold and HEXA, error from the core (this "
                      "machine, measured)",
            "values": {k: v.get("seconds") for k, v in model["methods"].items()},
            "met": any(k.endswith("/core") for k in model["methods"]) and all(
                "error" not in v and v["seconds"] < TARGET_MODEL_SECONDS
                for k, v in model["methods"].items() if k.endswith("/core")),
        } if not args.quick and not args.no_model else {"target": "n/a in --quick / --no-model"},
        "grid_never_below_dense": {
            "target": f">= {TARGET_GRID_RATIO}x of dense in speed and memory at every grid point (aggregate, "
                      "error from the core)",
            "values": {f"{r['d_out']}x{r['d_in']} K={r['K']} r={r['r']}": [
                r["ratios"]["speed_dense_over_aggregate"], r["ratios"]["memory_dense_over_aggregate"]]
                for r in ok_rows},
            "met": bool(ok_rows) and all(min(r["ratios"]["speed_dense_over_aggregate"],
                                             r["ratios"]["memory_dense_over_aggregate"]) >= TARGET_GRID_RATIO
                                         for r in ok_rows),
        },
    }
    meta["loadavg_1min_end"] = _loadavg()
    meta["total_seconds"] = time.perf_counter() - started
    first = next((r for r in ok_rows), {})
    meta["torch"] = first.get("torch")
    meta["threads"] = first.get("threads")
    meta["memory_method"] = first.get("memory_method")
    report = {"meta": meta, "grid": results, "model": model, "targets": targets}

    console.print(_grid_table(results))
    console.print("speed = dense time / factored time; mem = dense peak / factored peak (resident "
                  "memory above the process baseline, fresh process per configuration); rel diff = max over "
                  "truncate and aggregate of ||H_dense - H||_F / ||H_dense||_F (rank-r reconstructions); "
                  "FRA err = the round's aggregation error (fold_tail, exact up to rounding).",
                  highlight=False)
    if model["methods"]:
        console.print(_model_table(model))
        parts = ", ".join(f"{k}: {v['count']} x {_fmt_s(v['seconds_each'])} s" for k, v in dense_parts.items()
                          if v["seconds_each"] is not None)
        console.print(f"dense extrapolated = {parts} (measured above, one module each). Peak = resident "
                      "memory above the process baseline during aggregate(); 'of which corr.' = the "
                      "corrections it returns (exact tails, as factors). Dense 'in place' = one module's "
                      "dense peak (each tail folded into W at once); 'same outputs' = plus every module's "
                      "dense tail held, as aggregate() holds its corrections.", highlight=False)
    for key, tgt in targets.items():
        if "met" in tgt:
            console.print(f"target {key}: {tgt['target']}: "
                          + ("[green]met[/green]" if tgt["met"] else "[red]NOT met[/red]"))
    console.print(f"torch {meta['torch']}, {meta['threads']} threads, {meta['cpu_count']} CPUs; load average "
                  f"{meta['loadavg_1min_start']:.2f} at start, {meta['loadavg_1min_end']:.2f} at end; total "
                  f"{meta['total_seconds']:.0f} s", highlight=False)

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_finite(report), indent=2) + "\n")
    console.print(f"wrote {out}", highlight=False)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny smoke version (seconds)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON output path (default %(default)s)")
    parser.add_argument("--no-model", action="store_true", help="skip the full-model rounds")
    parser.add_argument("--cold", action="store_true",
                        help="model rounds with the default (first-round) allocator instead of the steady state")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the model rounds (top functions go to the JSON; adds overhead)")
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
