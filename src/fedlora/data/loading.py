"""Load a task split as a :class:`~fedlora.data.dataset.TextDataset`: local folder first, hub otherwise.

Resolution order for a named task (:func:`load_task`):

1. ``data_dir`` argument (the CLI's ``--data-dir``),
2. the ``FEDLORA_DATA_DIR`` environment variable,
3. the Hugging Face hub through ``datasets.load_dataset`` (needs a network or a warm cache).

A data folder is laid out like GLUE's download: ``<data_dir>/SST-2/train.tsv``. A task's folder is looked
for in ``data_dir``, then ``data_dir/glue``, then next to ``data_dir`` (so ``FEDLORA_DATA_DIR=.../data/glue``
also finds ``.../data/agnews``). When a folder is given, a missing file is an error, never a silent
download. Any other data: :func:`load_local` (a .csv/.tsv/.jsonl/.json/.parquet file with named columns),
:func:`load_hub` (any hub dataset id), or :func:`load_source`, which picks one of the three from a string.

Example
-------
>>> ds = load_task("sst2", data_dir="../shared/data/glue", split="validation", max_examples=100)
>>> len(ds), ds.label_names, ds.metric
(100, ('negative', 'positive'), 'accuracy')
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from .dataset import TextDataset, encode_labels, subsample
from .errors import DataError, DataFileNotFoundError
from .readers import SUFFIXES, Columns, read_table, require_columns
from .tasks import TASKS, TaskSpec, canonical_split, canonical_task_name, get_task

DATA_DIR_ENV = "FEDLORA_DATA_DIR"
HUB_PREFIX = "hub:"
HUB_SPLIT_FALLBACKS = {"dev": ("validation", "test"), "validation": ("dev", "test")}


def resolve_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """``data_dir`` if given, else ``$FEDLORA_DATA_DIR`` if set and non-empty, else ``None`` (use the hub)."""
    if data_dir is not None:
        return Path(data_dir)
    from_env = os.environ.get(DATA_DIR_ENV, "").strip()
    return Path(from_env) if from_env else None


def task_file(spec: TaskSpec, split: str, data_dir: str | Path) -> Path:
    """The file holding ``spec``'s ``split`` under ``data_dir``; else a :class:`DataFileNotFoundError`."""
    root = Path(data_dir)
    folders = (root / spec.folder, root / "glue" / spec.folder, root.parent / spec.folder)
    tried = [folder / name for folder in folders for name in spec.files[canonical_split(spec, split)]]
    for path in tried:
        if path.is_file():
            return path
    raise DataFileNotFoundError(
        f"{spec.name} {split}: no data file under {root} (tried {', '.join(str(p) for p in tried)})"
    )


def load_task(task: str, data_dir: str | Path | None = None, split: str = "train",
              max_examples: int | None = None, seed: int = 0) -> TextDataset:
    """Load one split of a registered task (GLUE or AG News).

    Parameters
    ----------
    task : str
        Registered name, case and ``-``/``_`` ignored: ``sst2``, ``cola``, ``mrpc``, ``rte``, ``qnli``,
        ``mnli``, ``qqp``, ``stsb``, ``agnews``.
    data_dir : str, Path or None (default: None)
        Folder laid out like GLUE's; ``None`` falls back to ``$FEDLORA_DATA_DIR``, then the hub.
    split : str (default: "train")
        ``train`` or ``validation`` (alias ``dev``; GLUE's dev set, AG News' test set); MNLI also has
        ``validation_mismatched``.
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples (file order kept).
    seed : int (default: 0)
        Seed of that subset.

    Returns
    -------
    TextDataset
        Texts, labels (ids, or floats for STS-B), label names, ``num_labels`` and the task's metric.
    """
    spec = get_task(task)
    split = canonical_split(spec, split)
    root = resolve_data_dir(data_dir)
    if root is None:
        return subsample(_load_task_from_hub(spec, split), max_examples, seed)
    path = task_file(spec, split, root)
    columns = read_table(path, quoting=spec.quoting)
    wanted = [spec.text_column, spec.text_pair_column, spec.label_column]
    if spec.headerless_columns and not all(c in columns for c in wanted if c):
        headerless = read_table(path, quoting=spec.quoting, fieldnames=spec.headerless_columns)
        if all(c in headerless for c in wanted if c):  # no header row: the first row was data
            columns = headerless
    dataset = _from_columns(columns, str(path), spec.text_column, spec.text_pair_column, spec.label_column,
                            spec.label_names, spec.is_regression, spec.metric, task=spec.name)
    return subsample(dataset, max_examples, seed)


def load_local(path: str | Path, text_column: str, label_column: str, text_pair_column: str | None = None,
               label_names: Sequence[str] | None = None, regression: bool = False, metric: str | None = None,
               quoting: int | None = None, max_examples: int | None = None, seed: int = 0) -> TextDataset:
    """Load a local .csv/.tsv/.jsonl/.json/.parquet file with named text and label columns.

    Parameters
    ----------
    path : str or Path
        The file; its suffix picks the reader (see :func:`fedlora.data.readers.read_table`).
    text_column : str
        Column of the (first) text.
    label_column : str
        Column of the label: class names, integer ids, or float scores with ``regression=True``.
    text_pair_column : str or None (default: None)
        Column of the second text for sentence-pair data.
    label_names : sequence of str or None (default: None)
        Class names in id order; ``None`` infers them (integer ids 0..max, else sorted distinct strings).
    regression : bool (default: False)
        Labels are float scores; ``num_labels`` is 1 and the metric defaults to ``pearson_spearman``.
    metric : str or None (default: None)
        Metric name; ``None`` means ``accuracy`` (``pearson_spearman`` for regression).
    quoting : int or None (default: None)
        ``csv`` quoting mode; ``None``: off for tab-separated files, minimal for ``.csv``.
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples.
    seed : int (default: 0)
        Seed of that subset.

    Returns
    -------
    TextDataset
        The examples, with ``task`` set to the path.
    """
    columns = read_table(path, quoting=quoting)
    dataset = _from_columns(columns, str(path), text_column, text_pair_column, label_column, label_names,
                            regression, metric, task=str(path))
    return subsample(dataset, max_examples, seed)


def load_hub(dataset_id: str, text_column: str, label_column: str, split: str = "train",
             text_pair_column: str | None = None, config: str | None = None,
             label_names: Sequence[str] | None = None, regression: bool = False, metric: str | None = None,
             max_examples: int | None = None, seed: int = 0) -> TextDataset:
    """Load any Hugging Face hub dataset with named text and label columns (needs network or cache).

    Parameters
    ----------
    dataset_id : str
        ``owner/name`` (a leading ``hub:`` is dropped).
    text_column : str
        Column of the (first) text.
    label_column : str
        Column of the label.
    split : str (default: "train")
        Hub split name; ``dev``/``validation`` fall back to each other, then to ``test``.
    text_pair_column : str or None (default: None)
        Column of the second text.
    config : str or None (default: None)
        Dataset configuration name.
    label_names : sequence of str or None (default: None)
        Class names in id order; ``None`` takes them from a ``ClassLabel`` feature, else infers them.
    regression : bool (default: False)
        Labels are float scores.
    metric : str or None (default: None)
        Metric name; ``None`` means ``accuracy`` (``pearson_spearman`` for regression).
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples.
    seed : int (default: 0)
        Seed of that subset.

    Returns
    -------
    TextDataset
        The examples, with ``task`` set to ``hub:<dataset_id>``.
    """
    dataset_id = dataset_id.removeprefix(HUB_PREFIX)
    columns, names = _hub_columns(dataset_id, config, split, label_column)
    where = _hub_where(dataset_id, config, split)
    dataset = _from_columns(columns, where, text_column, text_pair_column, label_column,
                            label_names or names, regression, metric, task=f"{HUB_PREFIX}{dataset_id}")
    return subsample(dataset, max_examples, seed)


def load_source(source: str, split: str = "train", data_dir: str | Path | None = None,
                max_examples: int | None = None, seed: int = 0, **columns) -> TextDataset:
    """Load from a string as a CLI would take it: a task name, ``hub:owner/name``, or a file path.

    Parameters
    ----------
    source : str
        A registered task name, ``hub:owner/name`` or a path ending in a supported suffix.
    split : str (default: "train")
        Split for a task or hub dataset (ignored for a file).
    data_dir : str, Path or None (default: None)
        Data folder for a registered task.
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples.
    seed : int (default: 0)
        Seed of that subset.
    **columns
        ``text_column``, ``label_column`` and the other keyword arguments of :func:`load_local` or
        :func:`load_hub`.

    Returns
    -------
    TextDataset
        The examples.
    """
    if source.startswith(HUB_PREFIX):
        return load_hub(source, split=split, max_examples=max_examples, seed=seed, **columns)
    if canonical_task_name(source) in TASKS and not Path(source).suffix:
        return load_task(source, data_dir=data_dir, split=split, max_examples=max_examples, seed=seed)
    if Path(source).suffix.lower() in SUFFIXES:
        return load_local(source, max_examples=max_examples, seed=seed, **columns)
    raise DataError(f"{source!r} is neither a task ({', '.join(sorted(TASKS))}), {HUB_PREFIX}owner/name, "
                    f"nor a file ending in {', '.join(SUFFIXES)}")


# ---------------------------------------------------------------- helpers

def _from_columns(columns: Columns, where: str, text_column: str, text_pair_column: str | None,
                  label_column: str, label_names: Sequence[str] | None, regression: bool,
                  metric: str | None, task: str) -> TextDataset:
    require_columns(columns, [text_column, text_pair_column, label_column], where)
    labels, names = encode_labels(columns[label_column], label_names, regression, where)
    pairs = None if text_pair_column is None else _as_texts(columns[text_pair_column])
    return TextDataset(texts=_as_texts(columns[text_column]), text_pairs=pairs, labels=labels,
                       label_names=names, num_labels=1 if regression else len(names),
                       metric=metric or ("pearson_spearman" if regression else "accuracy"), task=task)


def _as_texts(values: list) -> list[str]:
    return ["" if v is None else str(v) for v in values]


def _hub_columns(dataset_id: str, config: str | None, split: str,
                 label_column: str) -> tuple[Columns, tuple[str, ...] | None]:
    """Columns of a hub split and, if the label is a ``ClassLabel``, its names.

    A split the dataset lacks falls back through :data:`HUB_SPLIT_FALLBACKS` (``dev`` -> ``validation``
    -> ``test``), so ``load_source("hub:owner/name", "dev", ...)`` works on datasets without a dev split.
    """
    import datasets

    candidates = [split, *HUB_SPLIT_FALLBACKS.get(split, ())]
    for candidate in candidates:
        try:
            hub = datasets.load_dataset(dataset_id, config, split=candidate)
            break
        except ValueError as err:  # datasets: 'Unknown split "dev". Should be one of [...]'
            if "split" not in str(err).lower() or candidate == candidates[-1]:
                raise _hub_error(dataset_id, split, err) from err
        except Exception as err:  # noqa: BLE001  (network, auth, missing config: all one message)
            raise _hub_error(dataset_id, split, err) from err
    feature = hub.features.get(label_column)
    names = tuple(feature.names) if isinstance(feature, datasets.ClassLabel) else None
    return hub.to_dict(), names


def _hub_where(dataset_id: str, config: str | None, split: str) -> str:
    return f"{HUB_PREFIX}{dataset_id}" + (f"/{config}" if config else "") + f" [{split}]"


def _hub_error(dataset_id: str, split: str, err: Exception) -> DataError:
    reason = " ".join(str(err).split())  # one line, whatever the library said
    return DataError(f"{HUB_PREFIX}{dataset_id}: cannot load split {split!r} from the hub "
                     f"({type(err).__name__}: {reason}); offline, set {DATA_DIR_ENV} or pass --data-dir")


def _load_task_from_hub(spec: TaskSpec, split: str) -> TextDataset:
    text, pair, label = spec.columns_on_hub
    hub_split = spec.hub_splits.get(split, split)
    columns, _ = _hub_columns(spec.hub_path, spec.hub_name, hub_split, label)
    where = _hub_where(spec.hub_path, spec.hub_name, hub_split)
    return _from_columns(columns, where, text, pair, label, spec.label_names, spec.is_regression,
                         spec.metric, task=spec.name)
