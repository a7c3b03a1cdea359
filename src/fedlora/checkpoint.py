"""Round checkpoints: safetensors for tensors, JSON for the rest, each round written atomically and verifiable.

Layout under ``run_dir/checkpoints``::

    round_0001/  adapter.safetensors  correction.safetensors  [optimizer.safetensors]  state.json
    latest.json  -> {"round": 1, "dir": "round_0001"}

A round is written into a hidden temporary folder, flushed, then renamed into place; only then does
``latest.json`` move (write to a temporary file, ``os.replace``). A run killed at any instant leaves
``latest.json`` pointing at a complete round. Nothing is ever unpickled.

Each round's ``state.json`` records the size and SHA-256 of every tensor file of that round. Readers do not
trust ``latest.json`` alone: :func:`newest_intact_round` scans the round folders from the newest down and
takes the first whose files verify and whose earlier corrections (replayed on resume) verify too; the
rounds it passes over are named in one line each. Every read failure is a :class:`CheckpointError` that
names the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import fsync_dir as _fsync_dir
from .atomic import write_json_atomic
from .types import LoRAFactors, LowRank

CHECKPOINTS = "checkpoints"
LATEST = "latest.json"
STATE = "state.json"
_ROUND_DIR = re.compile(r"^round_(\d{4,})$")


class CheckpointError(ValueError):
    """A checkpoint cannot be used: missing, truncated or altered file; the message names it."""


def _digest(path: Path) -> dict:
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            sha.update(block)
    return {"size": path.stat().st_size, "sha256": sha.hexdigest()}


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
    files = {}
    for stem, group in tensors.items():
        if group:
            path = tmp / f"{stem}.safetensors"
            save_file({k: v.detach().contiguous().cpu() for k, v in group.items()}, str(path))
            files[path.name] = _digest(path)
    with open(tmp / STATE, "w") as fh:
        json.dump({**state, "files": files}, fh, indent=2)
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if final.exists():  # a round redone after resume replaces the stale copy
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    write_json_atomic(root / LATEST, {"round": round_number, "dir": name})
    return final


def round_dir(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / CHECKPOINTS / f"round_{round_number:04d}"


def round_numbers(run_dir: Path) -> list[int]:
    """The rounds that have a folder under ``checkpoints/`` (complete or not), ascending."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = (_ROUND_DIR.match(p.name) for p in root.iterdir() if p.is_dir())
    return sorted(int(m.group(1)) for m in found if m)


def has_checkpoints(run_dir: Path) -> bool:
    root = Path(run_dir) / CHECKPOINTS
    return bool(round_numbers(run_dir)) or (root / LATEST).is_file()


# ---------------------------------------------------------------- verification

@dataclass
class RoundCheck:
    """What :func:`check_round` found in one round folder: a problem per damaged file (file name -> line)."""

    number: int
    folder: Path
    problems: dict[str, str] = field(default_factory=dict)

    @property
    def intact(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        return "; ".join(f"{self.folder / name}: {why}" for name, why in self.problems.items())


def load_state(folder: Path) -> dict:
    """A round's ``state.json``; :class:`CheckpointError` naming the file if it is missing or not JSON."""
    path = Path(folder) / STATE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({str(err).splitlines()[0]})") from None
    if not isinstance(state, dict) or not isinstance(state.get("round"), int) or "config" not in state:
        raise CheckpointError(f"{path}: not a fedlora round state (no round number or config)")
    return state


def check_round(run_dir: Path, number: int) -> RoundCheck:
    """Verify round ``number``'s state and every tensor file it lists (size, then SHA-256)."""
    folder = round_dir(run_dir, number)
    check = RoundCheck(number, folder)
    try:
        state = load_state(folder)
    except CheckpointError as err:
        check.problems[STATE] = str(err).removeprefix(f"{folder / STATE}: ")
        return check
    if state["round"] != number:
        check.problems[STATE] = f"says round {state['round']}, expected {number}"
    files = state.get("files")
    if files is None:  # written before checksums existed: the files must at least load
        for path in sorted(folder.glob("*.safetensors")):
            try:
                load_file(str(path))
            except Exception as err:  # noqa: BLE001 - any read failure means damaged
                check.problems[path.name] = f"unreadable ({str(err).splitlines()[0]})"
        return check
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            check.problems[name] = "missing"
        elif path.stat().st_size != expected["size"]:
            check.problems[name] = f"truncated or altered (size {path.stat().st_size}, expected {expected['size']})"
        elif _digest(path)["sha256"] != expected["sha256"]:
            check.problems[name] = "altered (SHA-256 does not match state.json)"
    return check


def _replayable(check: RoundCheck) -> bool:
    """An earlier round is usable for replay when its state and its correction verify."""
    return not {STATE, "correction.safetensors"} & set(check.problems)


@dataclass
class IntactRound:
    """The round a resume or export starts from, and one line per newer round passed over."""

    number: int
    folder: Path
    skipped: list[str]


def verify_run(run_dir: Path) -> list[RoundCheck]:
    """Check every round folder of ``run_dir`` (ascending)."""
    return [check_round(run_dir, n) for n in round_numbers(run_dir)]


def newest_usable(checks: list[RoundCheck]) -> int | None:
    """The newest round that is intact, with rounds ``1..t-1`` all present and replayable."""
    by_number = {c.number: c for c in checks}
    best, prefix_ok = None, True
    for t in range(1, max(by_number, default=0) + 1):
        check = by_number.get(t)
        if check is None:
            break
        if prefix_ok and check.intact:
            best = t
        prefix_ok = prefix_ok and _replayable(check)
        if not prefix_ok:
            break
    return best


def newest_intact_round(run_dir: Path) -> IntactRound:
    """The newest usable round of ``run_dir`` (see :func:`newest_usable`); :class:`CheckpointError` if none."""
    run_dir = Path(run_dir)
    checks = verify_run(run_dir)
    best = newest_usable(checks)
    skipped = []
    for c in reversed(checks):
        if best is not None and c.number <= best:
            break
        why = c.summary() if not c.intact else "an earlier round's correction is damaged or missing"
        skipped.append(f"round {c.number} skipped: {why}")
    if best is None:
        if not checks:
            raise CheckpointError(f"{run_dir}: no checkpoint (no {CHECKPOINTS}/round_NNNN folder)")
        damaged = next(c for c in checks if not c.intact or not _replayable(c))
        raise CheckpointError(f"{run_dir}: no intact checkpoint; round {damaged.number}: {damaged.summary()}")
    return IntactRound(best, round_dir(run_dir, best), skipped)


def latest_round(run_dir: Path) -> tuple[int, Path] | None:
    """``(round_number, folder)`` of the newest usable round, or None."""
    try:
        found = newest_intact_round(run_dir)
    except CheckpointError:
        return None
    return found.number, found.folder


def remove_rounds_after(run_dir: Path, number: int) -> None:
    """Delete round folders newer than ``number`` (stale or damaged ones a resume will redo)."""
    for n in round_numbers(run_dir):
        if n > number:
            shutil.rmtree(round_dir(run_dir, n))
    write_json_atomic(Path(run_dir) / CHECKPOINTS / LATEST, {"round": number, "dir": round_dir(run_dir, number).name})


# ---------------------------------------------------------------- reading tensors

def load_tensors(folder: Path, stem: str, *, required: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``{stem}.safetensors`` (empty when an optional file is absent)."""
    path = Path(folder) / f"{stem}.safetensors"
    if not path.is_file():
        if required:
            raise CheckpointError(f"{path}: missing")
        return {}
    try:
        return load_file(str(path))
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error types
        raise CheckpointError(f"{path}: unreadable ({str(err).splitlines()[0]})") from None


def _get(tensors: dict[str, torch.Tensor], key: str, folder: Path, stem: str) -> torch.Tensor:
    try:
        return tensors[key]
    except KeyError:
        raise CheckpointError(f"{Path(folder) / f'{stem}.safetensors'}: missing tensor {key!r}") from None


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
    out = {}
    for m in modules:
        left, right = (_get(tensors, f"{m}.{side}", folder, "correction") for side in ("left", "right"))
        try:
            out[m] = LowRank(left, right)
        except ValueError as err:
            raise CheckpointError(f"{Path(folder) / 'correction.safetensors'}: {m}: {err}") from None
    return out


def load_round_corrections(run_dir: Path, round_number: int) -> dict[str, LowRank]:
    """The corrections folded in round ``round_number`` of ``run_dir`` (a loader for the correction history)."""
    return load_corrections(round_dir(run_dir, round_number))


def adapter_tensors(factors: dict[str, LoRAFactors], head: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``{module}.lora_A`` / ``{module}.lora_B`` for the global adapter and ``head.{name}`` for the heads."""
    out = {f"head.{k}": v for k, v in head.items()}
    for m, f in factors.items():
        out[f"{m}.lora_A"], out[f"{m}.lora_B"] = f.A, f.B
    return out


def load_adapter(folder: Path, scales: dict[str, float], head_names) -> tuple[dict[str, LoRAFactors], dict]:
    """The global adapter (at the given per-module scales) and heads saved by :func:`adapter_tensors`."""
    tensors = load_tensors(folder, "adapter", required=True)
    factors = {
        m: LoRAFactors(*(_get(tensors, f"{m}.lora_{x}", folder, "adapter") for x in "BA"), s)
        for m, s in scales.items()
    }
    return factors, {k: _get(tensors, f"head.{k}", folder, "adapter") for k in head_names}


def flatten_optimizers(states: dict[str, dict]) -> tuple[dict[str, torch.Tensor], dict]:
    """AdamW states as flat tensors (safetensors) plus JSON metadata; never pickled."""
    tensors, meta = {}, {}
    for cid, sd in states.items():
        meta[cid] = {"param_groups": sd["param_groups"], "params": []}
        for pid, st in sd["state"].items():
            names = []
            for key, value in st.items():
                tensors[f"{cid}.{pid}.{key}"] = torch.as_tensor(value).clone()
                names.append(key)
            meta[cid]["params"].append([pid, names])
    return tensors, meta


def unflatten_optimizers(tensors: dict[str, torch.Tensor], state: dict) -> dict[str, dict]:
    """The AdamW states :func:`flatten_optimizers` wrote (``state["optimizer_meta"]`` names them)."""
    out = {}
    for cid, info in state.get("optimizer_meta", {}).items():
        st = {int(pid): {k: tensors[f"{cid}.{pid}.{k}"] for k in names} for pid, names in info["params"]}
        out[cid] = {"state": st, "param_groups": info["param_groups"]}
    return out
