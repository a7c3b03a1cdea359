"""``fedlora sweep --workers N``: N processes share one sweep's cells.

On 2 shared cores two single-threaded runs at once take about a fifth less time than one after another at two
threads each (docs/results.md), so a long sweep runs N-1 extra ``fedlora sweep --no-report`` processes
beside the one the user started. Each claims a cell before running it (:func:`fedlora.sweep.claim`), so no
cell runs twice; each has ``cores / N`` threads and writes its log to ``OUT/workers/worker-K.log``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def threads_per_worker(workers: int) -> int:
    return max(1, (os.cpu_count() or 1) // workers)


def start_workers(spec_file: str, out: Path, data_dir: str | None, extra: int) -> list[subprocess.Popen]:
    """Start ``extra`` workers on the sweep in ``out``; their logs go to ``out/workers/``."""
    logs = out / "workers"
    logs.mkdir(parents=True, exist_ok=True)
    argv = [sys.executable, "-m", "fedlora.cli", "sweep", spec_file, "--out", str(out), "--no-report",
            "--of-workers", str(extra + 1)]  # its time left counts the runs on every worker, not only its own
    if data_dir:
        argv += ["--data-dir", data_dir]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads_per_worker(extra + 1))}
    procs = []
    for k in range(1, extra + 1):
        with open(logs / f"worker-{k}.log", "w") as log:
            procs.append(subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL))
    return procs


def check_workers(procs: list[subprocess.Popen], out: Path) -> None:
    """Raise ``ValueError`` with the first failed worker's last log line (after every worker has ended)."""
    for k, proc in enumerate(procs, start=1):
        if proc.returncode not in (0, None):
            log = out / "workers" / f"worker-{k}.log"
            lines = [line for line in log.read_text(errors="replace").splitlines() if line.strip()]
            last = lines[-1].strip() if lines else f"exit code {proc.returncode}"
            raise ValueError(f"sweep worker {k} failed: {last} (log: {log})")


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """Interrupted: stop the workers (a stopped cell resumes from its checkpoint on the next sweep)."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        proc.wait()
