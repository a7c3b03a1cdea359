"""Sweeps: methods x partitions x seeds (x ranks, x learning rates) as cells, one run folder each.

A sweep file (YAML)::

    config: recipes/configs/results/minilm_sst2.yaml   # the base run config (optional)
    overrides: [federation.rounds=10]                   # applied to every cell
    out: runs/sweep/sst2
    methods: [centralized, fedit, ffa, fedex, fra_fold=fra:fold_tail=true, hexa]
    partitions:
      iid: [partition.scheme=iid]
      dir0.5: [partition.scheme=dirichlet, partition.options.alpha=0.5]
    seeds: [0, 1, 2]
    ranks: [8]          # optional: lora.rank
    lrs: [0.005]        # optional: train.lr

A method item is ``name``, ``name:key=value:...`` (method options), ``label=name:key=value`` (a named
variant), or a mapping ``{label: fedit_lr, method: "fedit", overrides: [train.lr=0.002]}`` whose overrides
apply to that method's cells only (a learning rate chosen per method).

``centralized`` is the ceiling every table needs: one client holding all the training data
(``partition.num_clients=1``) that takes ``clients_per_round x local_steps`` steps a round, so it sees as
many examples per round as the federation does; it does not depend on the partition, so it runs once per
seed (and rank and rate) and every partition's cell points at that run.

``out/sweep.json`` lists every cell (name, folder, keys, status); a cell is done when its
``metrics.jsonl`` holds every round. Nothing here trains: the CLI runs the cells (resuming a killed one
from its checkpoint) and :mod:`fedlora.report_dir` reads the folder. Several processes may run one sweep
at once: each takes a cell's :func:`claim` (``out/claims/``) before running it, so no cell runs twice.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

try:
    import fcntl
except ImportError:  # not POSIX: a sweep runs in one process
    fcntl = None

from .atomic import write_json_atomic
from .checkpoint import has_checkpoints
from .config import RunConfig, load_config
from .runlog import METRICS_FILE, load_metrics, total_time

MANIFEST = "sweep.json"
CLAIMS = "claims"
CENTRALIZED = "centralized"
_KEYS = {"config", "overrides", "out", "methods", "partitions", "seeds", "ranks", "lrs"}


@dataclass(frozen=True)
class Method:
    label: str
    name: str
    overrides: tuple[str, ...] = ()


@dataclass
class SweepSpec:
    config: str | None
    overrides: list[str]
    out: Path
    methods: list[Method]
    partitions: dict[str, list[str]]
    seeds: list[int]
    ranks: list[int] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)


@dataclass
class Cell:
    """One run of the sweep: its name, folder (shared by a centralized run's partitions), keys, overrides."""

    name: str
    dir: Path
    keys: dict
    overrides: list[str]


def parse_method(item) -> Method:
    """``fedex``, ``hetlora:prune_threshold=0.05``, ``fra_fold=fra:fold_tail=true`` or a mapping with
    ``method``, optional ``label`` and ``overrides``."""
    if isinstance(item, dict):
        unknown = sorted(set(item) - {"label", "method", "overrides"})
        if unknown or "method" not in item or not isinstance(item.get("overrides", []), list):
            raise ValueError(f"methods: {item!r}: a mapping takes method, label and overrides (a list)")
        inner = parse_method(str(item["method"]))
        return Method(str(item.get("label") or inner.label), inner.name,
                      inner.overrides + tuple(str(o) for o in item.get("overrides", [])))
    item = str(item)
    label, _, spec = item.partition("=") if "=" in item.split(":")[0] else (None, "", item)
    name, *options = spec.strip().split(":")
    bad = [o for o in options if "=" not in o]
    if not name or bad:
        raise ValueError(f"methods: {item!r}: expected name[:key=value...] or label=name[:key=value...]")
    return Method((label or name).strip(), name.strip(), tuple(f"federation.method_options.{o}" for o in options))


def load_sweep(path: str | Path, out: str | None = None) -> SweepSpec:
    """Read a sweep file; one-line ValueErrors naming the key at fault."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with methods, partitions and seeds")
    unknown = sorted(set(raw) - _KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown key {unknown[0]!r}; expected {', '.join(sorted(_KEYS))}")
    for key in ("methods", "seeds"):
        if not isinstance(raw.get(key), list) or not raw[key]:
            raise ValueError(f"{path}: {key} must be a non-empty list")
    partitions = raw.get("partitions") or {"default": []}
    if not isinstance(partitions, dict) or not all(isinstance(v, list) for v in partitions.values()):
        raise ValueError(f"{path}: partitions must map a label to a list of key=value overrides")
    methods = [parse_method(m) for m in raw["methods"]]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"{path}: a method label is listed twice ({', '.join(labels)})")
    try:
        seeds = [int(s) for s in raw["seeds"]]
        ranks = [int(r) for r in raw.get("ranks") or []]
        lrs = [float(x) for x in raw.get("lrs") or []]
    except (TypeError, ValueError):
        raise ValueError(f"{path}: seeds and ranks must be whole numbers and lrs numbers") from None
    config = raw.get("config")
    if config is not None and not Path(config).is_file():
        raise ValueError(f"{path}: config {config} does not exist")
    return SweepSpec(config=config, overrides=[str(o) for o in raw.get("overrides") or []],
                     out=Path(out or raw.get("out") or "runs/sweep"), methods=methods,
                     partitions={str(k): [str(o) for o in v] for k, v in partitions.items()},
                     seeds=seeds, ranks=ranks, lrs=lrs)


def _tag(keys: dict, spec: SweepSpec) -> str:
    parts = [f"s{keys['seed']}"]
    if len(spec.ranks) > 1:
        parts.append(f"r{keys['rank']}")
    if len(spec.lrs) > 1:
        parts.append(f"lr{keys['lr']:g}")
    return "__".join(parts)


def centralized_overrides(cfg: RunConfig) -> list[str]:
    """One client with all the training data, seeing per round what the federation's round sees."""
    steps = cfg.train.local_steps * cfg.federation.clients_per_round
    return ["federation.method=fedit", "federation.method_options={}", "partition.num_clients=1",
            "partition.scheme=iid", "partition.options={}", "federation.clients_per_round=1",
            f"train.local_steps={steps}", "devices.assignment=null"]


def plan_cells(spec: SweepSpec, data_dir: str | None = None) -> list[Cell]:
    """Every cell of the grid, seeds outermost: a sweep stopped early holds whole tables for its first seeds."""
    cells = []
    for seed in spec.seeds:
        for part_label, part in spec.partitions.items():
            for rank in spec.ranks or [None]:
                for lr in spec.lrs or [None]:
                    for method in spec.methods:
                        cells.append(_cell(spec, method, part_label, part, seed, rank, lr, data_dir))
    return cells


def _cell(spec: SweepSpec, method: Method, part_label: str, part: list[str], seed: int, rank, lr,
          data_dir: str | None) -> Cell:
    keys = {"method": method.label, "partition": part_label, "seed": seed}
    grid = [f"seed={seed}"]
    if rank is not None:
        keys["rank"] = rank
        grid += [f"lora.rank={rank}", f"lora.alpha={2 * rank}"]
    if lr is not None:
        keys["lr"] = lr
        grid.append(f"train.lr={lr}")
    reset = ["partition.options={}"] if part else []  # a scheme's own options only
    base = [*spec.overrides, *reset, *part, *grid]
    if method.name == CENTRALIZED:
        base = [*base, *method.overrides]
        name = f"{method.label}__{_tag(keys, spec)}"
        overrides = [*base, *centralized_overrides(load_config(spec.config, base))]
    else:
        name = f"{method.label}__{part_label}__{_tag(keys, spec)}"
        overrides = [*base, f"federation.method={method.name}", "federation.method_options={}", *method.overrides]
    if data_dir:
        overrides.append(f"data.data_dir={data_dir}")
    return Cell(name, spec.out / "cells" / name, keys, overrides)


def cell_config(spec: SweepSpec, cell: Cell) -> RunConfig:
    return load_config(spec.config, [*cell.overrides, f"output_dir={cell.dir}"])


def cell_status(cell: Cell, rounds: int) -> str:
    """``done`` (every round recorded), ``partial`` (a checkpoint to resume from) or ``pending``."""
    metrics = cell.dir / METRICS_FILE
    if metrics.exists() and len(load_metrics(metrics)) >= rounds:
        return "done"
    return "partial" if has_checkpoints(cell.dir) else "pending"


def run_seconds(cell: Cell) -> float | None:
    """The measured wall-clock a cell's run took, as its report counts it (:func:`fedlora.runlog.total_time`)."""
    metrics = cell.dir / METRICS_FILE
    return total_time(load_metrics(metrics)) if metrics.exists() else None


def write_manifest(spec: SweepSpec, cells: list[Cell], status: dict[str, str]) -> Path:
    """``out/sweep.json``: the axes and every cell (folders relative to ``out``)."""
    axes = {"method": [m.label for m in spec.methods], "partition": list(spec.partitions), "seed": spec.seeds}
    if spec.ranks:
        axes["rank"] = spec.ranks
    if spec.lrs:
        axes["lr"] = spec.lrs
    doc = {"axes": axes, "cells": [{"name": c.name, "dir": str(c.dir.relative_to(spec.out)), "keys": c.keys,
                                    "status": status.get(c.name, "pending")} for c in cells]}
    spec.out.mkdir(parents=True, exist_ok=True)
    path = spec.out / MANIFEST
    write_json_atomic(path, doc)
    return path


@contextlib.contextmanager
def claim(out: Path, name: str) -> Iterator[bool]:
    """Hold ``name`` (a cell's folder name, or ``report``) for this process while the block runs: ``True``,
    or ``False`` when another process already holds it.

    An advisory lock (``flock``) on ``out/claims/NAME.lock``: the operating system drops it when its process
    ends, killed or not, so a crashed worker never leaves a stale claim. Processes on one machine (or on a
    shared filesystem whose locks work); where ``fcntl`` is missing every claim succeeds (one worker).
    """
    if fcntl is None:  # not POSIX: one worker, nothing to share
        yield True
        return
    path = out / CLAIMS / f"{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:  # the file stays: removing it would race with a process opening it
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def claims_work() -> bool:
    """Whether :func:`claim` can keep processes apart here (``fcntl``: POSIX systems)."""
    return fcntl is not None
