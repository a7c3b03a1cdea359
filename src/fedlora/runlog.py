"""The run log: one JSON record per round in ``<run_dir>/metrics.jsonl``, crash-safe, optionally mirrored to
TensorBoard under ``<run_dir>/tb``. The engine writes it through :class:`MetricsWriter`; everything else
reads it back with :func:`load_metrics` (tables and plots live in :mod:`fedlora.report`).

A record looks like::

    {"round": 1, "method": "hexa", "metric_name": "accuracy", "metric": 0.81, "eval_loss": 0.45,
     "local_metric": 0.80, "train_loss": 0.52, "agg_error": 1.2e-7, "agg_error_max": 3e-7,
     "bytes_up": 123456, "bytes_down": 234567, "bytes_up_per_client": {"3": 30000},
     "bytes_down_per_client": {"3": 60000}, "clients": ["3"], "rejected": [],
     "round_time_s": 12.3, "wall_time_s": 40.1}
"""

from __future__ import annotations

import json
import numbers
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .atomic import write_text_atomic

METRICS_FILE = "metrics.jsonl"
HIER_FILE = "hier.jsonl"  # HierFedLoRA's groupings and plans, one line each time they change

# --------------------------------------------------------------------------------------------------
# Writing and reading
# --------------------------------------------------------------------------------------------------


def _json_default(obj: Any) -> Any:
    """Make numpy / torch scalars and arrays JSON-serialisable."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return obj.tolist()
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise TypeError(f"object of type {type(obj).__name__} is not JSON serialisable")


def _is_number(value: Any) -> bool:
    """True for real numbers (Python or numpy), False for bools, None, strings and containers."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _repair_tail(path: Path) -> None:
    """Make ``path`` end on a whole line before anything is appended to it.

    A run killed mid-write can leave a final line without its newline. If that fragment is valid JSON
    only the newline is missing and it is added; otherwise the fragment is cut off, so that the next
    record does not get glued onto garbage.
    """
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return
    cut = data.rfind(b"\n") + 1  # 0 when the file is a single partial line
    try:
        json.loads(data[cut:])
    except ValueError:
        with path.open("r+b") as f:
            f.truncate(cut)
            f.flush()
            os.fsync(f.fileno())
    else:
        with path.open("ab") as f:
            f.write(b"\n")
            f.flush()
            os.fsync(f.fileno())


def _last_round(path: Path) -> int:
    """Largest ``round`` in the metrics file at ``path``; 0 if none (or no file)."""
    if not path.exists():
        return 0
    rounds = [int(r["round"]) for r in load_metrics(path) if _is_number(r.get("round"))]
    return max(rounds, default=0)


def append_jsonl(path: str | os.PathLike[str], records: list[Mapping[str, Any]]) -> None:
    """Append ``records`` as JSON lines to ``path`` (after repairing a cut-off last line), then fsync."""
    path = Path(path)
    _repair_tail(path)
    with path.open("a") as f:
        for record in records:
            f.write(json.dumps(record, default=_json_default) + "\n")
        f.flush()
        os.fsync(f.fileno())


def keep_jsonl_through(path: str | os.PathLike[str], round: int) -> None:  # noqa: A002
    """Drop the lines of ``path`` whose ``round`` is after ``round`` (a resumed run redoes those)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in load_metrics(path) if not (_is_number(r.get("round")) and r["round"] > round)]
        write_text_atomic(path, "".join(json.dumps(r, default=_json_default) + "\n" for r in kept))


class MetricsWriter:
    """Append per-round records to ``<run_dir>/metrics.jsonl`` and, optionally, TensorBoard.

    Every :meth:`write` is flushed and ``fsync``-ed, so a run killed at any point leaves a file of whole
    lines (at worst plus one partial line, which :func:`load_metrics` skips and the next writer on the
    same directory removes). The file this writer appends to is the run's record: when another program
    replaces or removes it while the run goes on (``git checkout`` or ``git stash`` of a committed copy,
    rsync, an editor), the next :meth:`write` puts back everything this writer holds, instead of
    appending to a file no longer on disk.

    Parameters
    ----------
    run_dir : str or os.PathLike
        Run directory; created if missing. An existing ``metrics.jsonl`` is appended to.
    tensorboard : bool, default True
        Also log every numeric top-level value of each record as a TensorBoard scalar under
        ``<run_dir>/tb``, with tag ``"<method>/<key>"`` and global step ``round``. When ``tb`` already
        holds event files, scalars of rounds after the last one in ``metrics.jsonl`` are purged, so a
        resumed run does not show the killed run's extra rounds twice.

    Examples
    --------
    >>> with MetricsWriter("runs/demo", tensorboard=False) as w:  # doctest: +SKIP
    ...     w.write({"round": 1, "method": "fedavg", "metric": 0.8})
    """

    def __init__(self, run_dir: str | os.PathLike[str], tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self.tb_dir = self.run_dir / "tb"
        self.tensorboard = tensorboard
        _repair_tail(self.path)
        self._file: Any = self.path.open("a+", encoding="utf-8")  # "+": readable, for _restore_if_replaced
        self._tb: Any = None
        if tensorboard:
            # metrics.jsonl is the source of truth: on an existing run, hide TensorBoard scalars of
            # rounds it does not hold (logged by a killed run, or cut by ``truncate_after`` elsewhere).
            stale = self.tb_dir.is_dir() and any(self.tb_dir.glob("events.out.tfevents.*"))
            self._tb = self._open_tensorboard(purge_step=_last_round(self.path) + 1 if stale else None)

    def _open_tensorboard(self, purge_step: int | None = None) -> Any:
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when asked for

        return SummaryWriter(log_dir=str(self.tb_dir), purge_step=purge_step)

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` has been called."""
        return self._file is None

    def write(self, record: Mapping[str, Any]) -> None:
        """Append one record as a JSON line (flushed and fsync-ed) and log its scalars.

        Parameters
        ----------
        record : Mapping
            One round's metrics. Must hold an integer ``"round"``; numpy/torch scalars are converted.

        Raises
        ------
        ValueError
            If the writer is closed or ``record["round"]`` is not an integer.
        """
        if self._file is None:
            raise ValueError("write to a closed MetricsWriter")
        step = record.get("round")
        if not isinstance(step, numbers.Integral) or isinstance(step, bool):
            raise ValueError(f"record needs an integer 'round', got {step!r}")
        line = json.dumps(dict(record), default=_json_default, ensure_ascii=False)
        self._restore_if_replaced()
        self._file.write(line + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        if self._tb is not None:
            method = str(record.get("method") or "run")
            for key, value in record.items():
                if key != "round" and _is_number(value):
                    self._tb.add_scalar(f"{method}/{key}", float(value), global_step=int(step))
            self._tb.flush()

    def _restore_if_replaced(self) -> None:
        """If ``self.path`` is no longer the file this writer holds open, write what it holds there."""
        held = os.fstat(self._file.fileno())
        try:
            on_disk = os.stat(self.path)
            if (on_disk.st_dev, on_disk.st_ino) == (held.st_dev, held.st_ino):
                return
        except FileNotFoundError:
            pass
        self._file.seek(0)
        text = self._file.read()
        self._file.close()
        self._file = None
        write_text_atomic(self.path, text)
        self._file = self.path.open("a+", encoding="utf-8")

    def truncate_after(self, round: int) -> int:  # noqa: A002 - the name the callers use
        """Keep only records with ``record["round"] <= round`` (used when resuming a run).

        The file is rewritten atomically (temporary file in the same directory, then :func:`os.replace`).
        TensorBoard is reopened with ``purge_step=round + 1`` so that TensorBoard hides the scalars the
        discarded rounds had logged.

        Parameters
        ----------
        round : int
            Last round to keep.

        Returns
        -------
        int
            Number of records kept.
        """
        if self._file is None:
            raise ValueError("truncate_after on a closed MetricsWriter")
        self._file.close()
        self._file = None
        records = load_metrics(self.path) if self.path.exists() else []
        kept = [r for r in records if _is_number(r.get("round")) and r["round"] <= round]
        try:
            write_text_atomic(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept))
        finally:
            self._file = self.path.open("a+", encoding="utf-8")
        if self._tb is not None:
            self._tb.close()
            self._tb = self._open_tensorboard(purge_step=int(round) + 1)
        return len(kept)

    def close(self) -> None:
        """Close the log file and the TensorBoard writer; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def load_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Read a metrics JSONL file (or the ``metrics.jsonl`` inside a run directory).

    Blank lines are ignored. A final line that is not valid JSON -- what a run killed mid-write leaves
    -- is skipped.

    Parameters
    ----------
    path : str or os.PathLike
        The ``.jsonl`` file, or a run directory holding ``metrics.jsonl``.

    Returns
    -------
    list of dict
        The records, in file order.

    Raises
    ------
    ValueError
        If a line other than the last is not a JSON object.
    """
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    lines = p.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    records: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as err:
            if i == len(lines) - 1:
                break  # partial trailing line
            raise ValueError(f"{p}:{i + 1}: not valid JSON: {err}") from err
        if not isinstance(obj, dict):
            raise ValueError(f"{p}:{i + 1}: expected a JSON object, got {type(obj).__name__}")
        records.append(obj)
    return records


def total_time(records: Iterable[Mapping[str, Any]]) -> float | None:
    """A run's measured wall-clock: its largest cumulative ``wall_time_s``; else the sum of ``round_time_s``;
    else None (missing, null and non-numeric values are skipped)."""
    records = list(records)
    wall = [float(r["wall_time_s"]) for r in records if _is_number(r.get("wall_time_s"))]
    if wall:
        return max(wall)
    per_round = [float(r["round_time_s"]) for r in records if _is_number(r.get("round_time_s"))]
    return sum(per_round) if per_round else None
