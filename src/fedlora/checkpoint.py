"""Round checkpoints: safetensors for tensors, JSON for the rest, each round written atomically.

Layout under ``run_dir/checkpoints``::

    round_0001/  adapter.safetensors  correction.safetensors  [optimizer.safetensors]  state.json
    latest.json  -> {"round": 1, "dir": "round_0001"}

A round is written into a hidden temporary folder, flushed, then renamed into place; only then does
``latest.json`` move (write to a temporary file, ``os.replace``). A run killed at any instant leaves
``latest.json`` pointing at a complete round. Nothing is ever unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .types import LoRAFactors, LowRank

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as fh:
        json.dump(data, fh, indent=2)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_round(
    run_dir: Path, round_number: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict
) -> Path:
    """Write ``tensors`` (file stem -> name -> tensor) and ``state`` as round ``round_number``."""
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    name = f"round_{round_number:04d}"
    final = root / name
    tmp = root / f".tmp-{name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    for stem, group in tensors.items():
        if group:
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(tmp / f"{stem}.safetensors"))
    with open(tmp / "state.json", "w") as fh:
        json.dump(state, fh, indent=2)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a round redone after resume replaces the stale copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json_atomic(root / LATEST, {"round": round_number, "dir": name})
    return final


def latest_round(run_dir: Path) -> tuple[int, Path] | None:
    """``(round_number, folder)`` of the newest complete round, or None."""
    pointer = Path(run_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    info = json.loads(pointer.read_text())
    return int(info["round"]), pointer.parent / info["dir"]


def round_dir(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_number:04d}"


def load_tensors(folder: Path, stem: str) -> dict[str, torch.Tensor]:
    path = Path(folder) / f"{stem}.safetensors"
    return load_file(str(path)) if path.is_file() else {}


def load_state(folder: Path) -> dict:
    return json.loads((Path(folder) / "state.json").read_text())


# ---------------------------------------------------------------- tensor layouts of a round

def correction_tensors(corrections: dict[str, LowRank]) -> dict[str, torch.Tensor]:
    """``{module}.left`` / ``{module}.right`` for one round's corrections."""
    out = {}
    for m, c in corrections.items():
        out[f"{m}.left"], out[f"{m}.right"] = c.left, c.right
    return out


def load_corrections(folder: Path) -> dict[str, LowRank]:
    tensors = load_tensors(folder, "correction")
    modules = sorted({k.rsplit(".", 1)[0] for k in tensors})
    return {m: LowRank(tensors[f"{m}.left"], tensors[f"{m}.right"]) for m in modules}


def adapter_tensors(factors: dict[str, LoRAFactors], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module}.lora_A`` / ``{module}.lora_B`` for the global adapter and ``head.{name}`` for the heads."""
    out = {f"head.{k}": v for k, v in head.items()}
    for m, f in factors.items():
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = f.A, f.B
    return out


def load_adapter(folder: Path, scales: dict[str, float], head_names) -> tuple[dict[str, LoRAFactors], dict]:
    """The global adapter (at the given per-module scales) and heads saved by :func:`adapter_tensors`."""
    tensors = load_tensors(folder, "adapter")
    factors = {m: LoRAFactors(tensors[f"{m}.lora_B"], tensors[f"{m}.lora_A"], s) for m, s in scales.items()}
    return factors, {k: tensors[f"head.{k}"] for k in head_names}
