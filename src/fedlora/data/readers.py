"""Read a local table (.tsv, .csv, .jsonl, .json, .parquet) into columns, with one-line errors.

No pandas: ``csv`` for delimited text (so the quoting mode is explicit; GLUE needs ``csv.QUOTE_NONE``),
``json`` for JSON, ``pyarrow`` (a ``datasets`` dependency) for parquet.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

from .errors import DataError, DataFileNotFoundError

Columns = dict[str, list]
SUFFIXES = (".tsv", ".txt", ".csv", ".jsonl", ".json", ".parquet")


def read_table(path: str | Path, quoting: int | None = None,
               fieldnames: tuple[str, ...] | None = None) -> Columns:
    """Read a file into ``{column: values}``; the format comes from the suffix.

    Parameters
    ----------
    path : str or Path
        A ``.tsv``/``.txt`` (tab), ``.csv`` (comma), ``.jsonl``, ``.json`` or ``.parquet`` file.
    quoting : int or None (default: None)
        ``csv`` quoting mode for delimited files; ``None`` means ``csv.QUOTE_NONE`` for tab-separated files
        (GLUE's convention) and ``csv.QUOTE_MINIMAL`` for ``.csv``.
    fieldnames : tuple of str or None (default: None)
        Column names of a delimited file without a header row; ``None`` reads them from the first row.

    Returns
    -------
    Columns
        Column name -> list of values (strings for delimited files, JSON/arrow types otherwise).

    Raises
    ------
    DataFileNotFoundError
        ``path`` does not exist.
    DataError
        Unknown suffix or a file that does not parse.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileNotFoundError(f"{path}: no such file")
    suffix = path.suffix.lower()
    try:
        if suffix in (".tsv", ".txt", ".csv"):
            delimiter = "," if suffix == ".csv" else "\t"
            if quoting is None:
                quoting = csv.QUOTE_MINIMAL if suffix == ".csv" else csv.QUOTE_NONE
            return _read_delimited(path, delimiter, quoting, fieldnames)
        if suffix == ".jsonl":
            return _records_to_columns(path, _read_json_lines(path))
        if suffix == ".json":
            return _read_json(path)
        if suffix == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pydict()
    except (csv.Error, json.JSONDecodeError, UnicodeDecodeError, OSError) as err:
        raise DataError(f"{path}: cannot parse ({type(err).__name__}: {' '.join(str(err).split())})") from err
    raise DataError(f"{path}: unsupported file type {suffix!r}; use one of {', '.join(SUFFIXES)}")


def require_columns(columns: Columns, names: list[str | None], where: str | Path) -> None:
    """Raise a one-line :class:`DataError` if any non-None name in ``names`` is not a column."""
    for name in names:
        if name is not None and name not in columns:
            raise DataError(f"{where}: no column {name!r}; available columns: {', '.join(map(str, columns))}")


def _read_delimited(path: Path, delimiter: str, quoting: int, fieldnames: tuple[str, ...] | None) -> Columns:
    # utf-8-sig drops a byte-order mark (GLUE's MRPC files start with one).
    with path.open(encoding="utf-8-sig", newline="") as handle:
        rows = csv.reader(handle, delimiter=delimiter, quoting=quoting)
        header = list(fieldnames) if fieldnames is not None else next(rows, None)
        if not header:
            raise DataError(f"{path}: empty file")
        columns: Columns = {name: [] for name in header}
        values = list(columns.values())
        skipped = 0
        for row in rows:
            if len(row) != len(header):
                skipped += bool(row)  # blank lines are not counted
                continue
            for column, value in zip(values, row):
                column.append(value)
    if skipped:
        warnings.warn(f"{path}: skipped {skipped} rows whose field count is not {len(header)}", stacklevel=3)
    return columns


def _read_json_lines(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def _read_json(path: Path) -> Columns:
    """A list of records, a dict of columns, or (despite the suffix) JSON lines."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _records_to_columns(path, _read_json_lines(path))
    if isinstance(data, dict) and all(isinstance(v, list) for v in data.values()):
        return data
    if isinstance(data, list):
        return _records_to_columns(path, data)
    raise DataError(f"{path}: expected a list of records or a dict of columns, got {type(data).__name__}")


def _records_to_columns(path: Path, records: list) -> Columns:
    if not all(isinstance(r, dict) for r in records):
        raise DataError(f"{path}: every JSON record must be an object")
    names = list(dict.fromkeys(key for record in records for key in record))
    return {name: [record.get(name) for record in records] for name in names}
