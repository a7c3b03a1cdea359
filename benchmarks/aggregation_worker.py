"""The measuring side of ``benchmarks/aggregation.py``: one grid configuration or one model round, run in a
fresh process so its memory high-water mark is its own (see that file's docstring for what is measured).

    .venv/bin/python benchmarks/aggregation_worker.py config '{"d_out": 768, "d_in": 768, "K": 10, "r": 16, ...}'
"""

from __future__ import annotations

import ctypes
import gc
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

MIB = 1024 * 1024
PAGE = 4096

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    return bool(libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)) == 1 and ok)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


class PeakMeter:
    """Peak resident memory of one call: reset the kernel's high-water mark, run, read it."""

    def __init__(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            _status_kib("VmHWM")
            self.method = "VmHWM after clear_refs=5 minus VmRSS before"
        except (OSError, KeyError):
            self.method = "ru_maxrss after minus before (high-water mark not resettable)"

    def start(self) -> None:
        gc.collect()
        if self.method.startswith("VmHWM"):
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")
            self._base = _status_kib("VmRSS")
        else:
            import resource
            self._base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop(self) -> int:
        """Bytes above the baseline at the peak."""
        if self.method.startswith("VmHWM"):
            peak = _status_kib("VmHWM")
        else:
            import resource
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak - self._base) * 1024


def _make_round(d_out: int, d_in: int, K: int, r: int, seed: int, scale: float = 2.0):
    """Global adapter of one module and K client updates: shared direction plus client drift."""
    import torch

    from fedlora.types import ClientUpdate, LoRAFactors, ModuleState

    gen = torch.Generator().manual_seed(seed)
    B0 = torch.randn(d_out, r, generator=gen) * 0.02
    A0 = torch.randn(r, d_in, generator=gen) / math.sqrt(d_in)
    state = {"m": ModuleState(LoRAFactors(B0, A0, scale))}
    sizes = torch.randint(50, 500, (K,), generator=gen).tolist()
    updates = []
    for k in range(K):
        B = B0 + 0.5 * 0.02 * torch.randn(d_out, r, generator=gen)
        A = A0 + (0.5 / math.sqrt(d_in)) * torch.randn(r, d_in, generator=gen)
        updates.append(ClientUpdate(f"c{k}", {"m": LoRAFactors(B, A, scale)}, num_examples=int(sizes[k])))
    return state, updates


def _paths(state, updates, r):
    import torch

    from fedlora import lowrank
    from fedlora.aggregators import get_aggregator
    from fedlora.aggregators import data_weights

    fra = get_aggregator("fra", fold_tail=True)
    p = data_weights(updates)
    factors = [u.factors["m"] for u in updates]
    d_out, d_in = state["m"].factors.shape

    def aggregate():
        return fra.aggregate(state, updates, 0, error_measure="core")

    def exact():
        return fra.aggregate(state, updates, 0, error_measure="exact")

    def truncate():
        return lowrank.truncate(lowrank.concat([f.as_lowrank() for f in factors], p), r)

    def dense():
        M = torch.zeros(d_out, d_in, dtype=factors[0].B.dtype)
        for pk, f in zip(p, factors):
            M.addmm_(f.B, f.A, alpha=pk * f.scale)
        U, S, Vh = torch.linalg.svd(M, full_matrices=False)
        root = S[:r].sqrt()
        head_left, head_right = U[:, :r] * root, root[:, None] * Vh[:r]
        del U, Vh
        M.addmm_(head_left, head_right, alpha=-1.0)  # M is now the tail folded into W
        return head_left, head_right, M, S

    return {"truncate": truncate, "aggregate": aggregate, "exact": exact, "dense": dense}


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def worker_config(task: dict) -> dict:
    """One grid configuration: memory of each path (fresh-mmap allocator), then timing repeats."""
    mallopt_ok = _mallopt(16 * 1024, 16 * 1024)
    import torch

    from fedlora import lowrank

    torch.set_grad_enabled(False)
    d_out, d_in, K, r = task["d_out"], task["d_in"], task["K"], task["r"]
    meter = PeakMeter()
    # warm-up on a tiny module: library initialisation is charged to nobody
    tiny_state, tiny_updates = _make_round(48, 40, min(K, 3), min(r, 8), seed=1)
    for fn in _paths(tiny_state, tiny_updates, min(r, 8)).values():
        fn()
    state, updates = _make_round(d_out, d_in, K, r, seed=task["seed"])
    paths = _paths(state, updates, r)
    load_before = _loadavg()

    peak, mem_time = {}, {}
    for name in ("truncate", "aggregate", "exact", "dense"):
        meter.start()
        t0 = time.perf_counter()
        out = paths[name]()
        mem_time[name] = time.perf_counter() - t0
        peak[name] = meter.stop()
        if name == "dense":
            dense_out = out  # kept for the agreement check (no second dense SVD)
        del out
        gc.collect()

    # timing: allocator in its steady state, paths interleaved
    _mallopt(32 * MIB, 64 * MIB)
    times = {name: [] for name in paths}
    for name in ("truncate", "aggregate", "exact"):
        paths[name]()  # warm the heap at this size
    for i in range(max(task["reps_factored"], task["reps_dense"])):
        for name in ("truncate", "aggregate", "exact", "dense"):
            reps = task["reps_dense"] if name == "dense" else task["reps_factored"]
            if i < reps:
                t0 = time.perf_counter()
                paths[name]()
                times[name].append(time.perf_counter() - t0)
    for name in times:
        if not times[name]:  # the single (memory) run is the timing
            times[name] = [mem_time[name]]
    load_after = _loadavg()

    # agreement, untimed
    head_left, head_right, tail_dense, S_dense = dense_out
    H_dense = head_left @ head_right

    def norm(t):  # float64: a float32 norm of a 4096 x 4096 matrix is off by ~1e-4
        return float(torch.linalg.matrix_norm(t.double()))

    ref = norm(H_dense)
    head, tail, tail_s = paths["truncate"]()
    _, S_fact, _ = lowrank.svd(lowrank.concat([u.factors["m"].as_lowrank() for u in updates],
                                              [float(w) for w in _weights(updates)]))
    res = paths["aggregate"]()
    g = res.global_state["m"].factors
    n = min(S_fact.numel(), S_dense.numel())
    agreement = {
        "head_rel_diff_truncate": norm(H_dense - head.dense()) / ref,
        "head_rel_diff_aggregate": norm(H_dense - g.delta()) / ref,
        "singular_values_max_diff_rel": float((S_fact[:n] - S_dense[:n]).abs().max() / S_dense[0]),
        "tail_norm_rel_diff": abs(norm(tail_dense) - float(tail_s.double().square().sum().sqrt()))
        / max(norm(tail_dense), 1e-30),
        "tail_rel_norm": norm(tail_dense) / max(norm(H_dense + tail_dense), 1e-30),
        "fra_aggregation_error": float(res.error),
        "fra_aggregation_error_exact": float(paths["exact"]().error),
    }
    stacked = lowrank.concat([u.factors["m"].as_lowrank() for u in updates])
    return {
        "d_out": d_out, "d_in": d_in, "K": K, "r": r, "label": task.get("label", ""),
        "path": "dense" if lowrank.prefers_dense(stacked) else "factored",  # the library's choice for M
        "time_s": {k: statistics.median(v) for k, v in times.items()},
        "time_min_s": {k: min(v) for k, v in times.items()},
        "time_samples_s": times,
        "memory_run_time_s": mem_time,
        "peak_bytes": peak,
        "agreement": agreement,
        "repeats": {"factored": task["reps_factored"], "dense": task["reps_dense"]},
        "memory_method": meter.method
        + (" (mallopt mmap threshold 16 KiB)" if mallopt_ok else " (mallopt failed)"),
        "loadavg_1min": [load_before, load_after],
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def _weights(updates):
    from fedlora.aggregators import data_weights

    return data_weights(updates)


def _model_shapes(layers: int, hidden: int, inter: int) -> dict[str, tuple[int, int]]:
    shapes = {}
    for layer in range(layers):
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[f"layers.{layer}.self_attn.{name}"] = (hidden, hidden)
        shapes[f"layers.{layer}.mlp.gate_proj"] = (inter, hidden)
        shapes[f"layers.{layer}.mlp.up_proj"] = (inter, hidden)
        shapes[f"layers.{layer}.mlp.down_proj"] = (hidden, inter)
    return shapes


def worker_model(task: dict) -> dict:
    """One full-model round with one method; time and peak resident memory of the ``aggregate`` call.

    The allocator is put in glibc's steady state first (as the grid's timing repeats are): a server that
    aggregates every round has raised its mmap threshold after the first round, so its temporaries come from
    the heap instead of fresh, page-faulted mappings (``--cold`` keeps the default, first-round allocator).
    """
    if not task.get("cold"):
        _mallopt(32 * MIB, 64 * MIB)
    import torch

    from fedlora.aggregators import get_aggregator
    from fedlora.types import ClientUpdate, LoRAFactors, ModuleState

    torch.set_grad_enabled(False)
    K, r, scale = task["K"], task["r"], 2.0
    shapes = _model_shapes(task["layers"], task["hidden"], task["intermediate"])
    meter = PeakMeter()
    agg = get_aggregator(task["method"], **task["options"])
    # warm-up on a tiny two-module model
    tiny_state, tiny_updates = _make_round(48, 40, 3, 8, seed=1)
    agg.aggregate(tiny_state, tiny_updates, 0)

    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(task["seed"])
    state = {}
    for name, (d_out, d_in) in shapes.items():
        state[name] = ModuleState(LoRAFactors(torch.randn(d_out, r, generator=gen) * 0.02,
                                              torch.randn(r, d_in, generator=gen) / math.sqrt(d_in), scale))
    sizes = torch.randint(50, 500, (K,), generator=gen).tolist()
    updates = []
    for k in range(K):
        factors = {}
        for name, st in state.items():
            f = st.factors
            d_out, d_in = f.shape
            B = torch.randn(d_out, r, generator=gen).mul_(0.5 * 0.02).add_(f.B)
            A = torch.randn(r, d_in, generator=gen).mul_(0.5 / math.sqrt(d_in)).add_(f.A)
            factors[name] = LoRAFactors(B, A, scale)
        updates.append(ClientUpdate(f"c{k}", factors, num_examples=int(sizes[k])))
    setup_s = time.perf_counter() - t0
    input_bytes = sum(f.B.numel() + f.A.numel() for u in updates for f in u.factors.values()) * 4
    first = {}
    if not task.get("cold"):
        # The previous round, timed and measured (its peak is the memory figure: a first round grows the
        # heap); its outputs are then folded and freed, and the round below runs in the steady state.
        meter.start()
        t0 = time.perf_counter()
        previous = agg.aggregate(state, updates, 0, error_measure=task["error_measure"])
        first = {"seconds_first_round": time.perf_counter() - t0, "peak_bytes_first_round": meter.stop()}
        del previous
        gc.collect()

    load_before = _loadavg()
    profile = None
    meter.start()
    if task.get("profile"):
        import cProfile
        import pstats

        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        res = agg.aggregate(state, updates, 0, error_measure=task["error_measure"])
        prof.disable()
        seconds = time.perf_counter() - t0
        stats = pstats.Stats(prof)
        rows = sorted(stats.stats.items(), key=lambda kv: kv[1][2], reverse=True)[:15]
        profile = [
            {"function": f"{Path(fn).name}:{line}({func})", "calls": cc, "tottime_s": tt, "cumtime_s": ct}
            for (fn, line, func), (cc, _nc, tt, ct, _callers) in rows
        ]
    else:
        t0 = time.perf_counter()
        res = agg.aggregate(state, updates, 0, error_measure=task["error_measure"])
        seconds = time.perf_counter() - t0
    peak = meter.stop()
    # The floor in the same process: each module's bare truncated SVD of M, at the data weights.
    from fedlora import lowrank

    p = _weights(updates)
    t0 = time.perf_counter()
    for name in shapes:
        lowrank.truncate(lowrank.concat([u.factors[name].as_lowrank() for u in updates], p), r)
    truncate_s = time.perf_counter() - t0
    load_after = _loadavg()
    correction_numel = sum(c.left.numel() + c.right.numel() for c in res.corrections.values())
    return {
        "method": task["method"], "options": task["options"], "error_measure": task["error_measure"],
        "modules": len(shapes), "K": K, "r": r, "seconds": seconds, "parts_s": res.seconds,
        "truncate_s": truncate_s, "over_truncate": seconds / truncate_s,
        "peak_bytes": first.get("peak_bytes_first_round", peak), **first, "setup_s": setup_s,
        "input_bytes": input_bytes,
        "correction_factor_bytes": correction_numel * 4,
        "aggregation_error": float(res.error), "max_module_error": max(res.errors.values()),
        "profile_tottime": profile,
        "memory_method": meter.method + (" (default allocator)" if task.get("cold") else
                                         " of the first round (mallopt mmap threshold 32 MiB)"),
        "loadavg_1min": [load_before, load_after],
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }


def main(argv: list[str]) -> int:
    kind, task = argv[0], json.loads(argv[1])
    result = worker_config(task) if kind == "config" else worker_model(task)
    print(json.dumps(result, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
