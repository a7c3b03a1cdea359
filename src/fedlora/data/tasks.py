"""Registry of the text-classification tasks fedlora knows by name: the GLUE tasks and AG News.

A :class:`TaskSpec` says where a task's files are under a data folder laid out like GLUE's download
(``SST-2/train.tsv``), which columns hold the text(s) and the label, how raw labels map to ids, which
metric GLUE reports for it, and how to fetch the same data from the Hugging Face hub when no folder is
given. Label ids follow the hub's ``glue`` and ``fancyzhx/ag_news`` datasets, so local and hub data agree.

Example
-------
>>> from fedlora.data.tasks import get_task
>>> spec = get_task("SST-2")
>>> spec.name, spec.num_labels, spec.metric, spec.label_map["positive"], spec.label_map["1"]
('sst2', 2, 'accuracy', 1, 1)
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field

from .errors import DataError

TRAIN, VALIDATION = "train", "validation"
SPLIT_ALIASES = {"dev": VALIDATION, "val": VALIDATION, "valid": VALIDATION, "validation_matched": VALIDATION}


@dataclass(frozen=True)
class TaskSpec:
    """Where a task's data lives and how to read it.

    Parameters
    ----------
    name : str
        Registry key, lower case without separators (``"sst2"``, ``"stsb"``, ``"agnews"``).
    folder : str
        Folder under the data directory (``"SST-2"``, ``"agnews"``).
    files : dict[str, tuple[str, ...]]
        Split name -> candidate file names inside ``folder``; the first that exists is read.
    text_column : str
        Column holding the (first) text.
    label_column : str
        Column holding the label (a class name, a class id, or a float score for regression).
    label_names : tuple[str, ...]
        Class names in id order; empty for a regression task (STS-B).
    metric : str
        Metric name understood by :func:`fedlora.data.metrics.compute_metric`.
    hub_path : str
        ``datasets.load_dataset`` path (``"glue"``, ``"fancyzhx/ag_news"``).
    hub_name : str or None
        ``datasets.load_dataset`` config name (``"sst2"``), if any.
    text_pair_column : str or None (default: None)
        Column holding the second text of a sentence-pair task.
    hub_columns : tuple[str, str | None, str] or None (default: None)
        ``(text, text_pair, label)`` columns on the hub when they differ from the local file's.
    hub_splits : dict[str, str] (default: {})
        Local split name -> hub split name, when they differ (AG News has no validation split: ``test``).
    quoting : int (default: csv.QUOTE_NONE)
        ``csv`` quoting mode of the local files. GLUE's TSVs hold stray quote characters and must be read
        with quoting off; the shared AG News TSVs were written with CSV quoting (``csv.QUOTE_MINIMAL``).
    headerless_columns : tuple[str, ...] or None (default: None)
        Column names to use when a file has no header row (CoLA as shipped by GLUE).
    """

    name: str
    folder: str
    files: dict[str, tuple[str, ...]]
    text_column: str
    label_column: str
    label_names: tuple[str, ...]
    metric: str
    hub_path: str
    hub_name: str | None
    text_pair_column: str | None = None
    hub_columns: tuple[str, str | None, str] | None = None
    hub_splits: dict[str, str] = field(default_factory=dict)
    quoting: int = csv.QUOTE_NONE
    headerless_columns: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        """True for a task scored by a float (STS-B)."""
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Number of classifier outputs: 1 for regression, else the number of classes."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def label_map(self) -> dict[str, int]:
        """Raw label string -> class id: each class name and each id written as a string."""
        by_name = {label: i for i, label in enumerate(self.label_names)}
        return by_name | {str(i): i for i in range(len(self.label_names))}

    @property
    def splits(self) -> tuple[str, ...]:
        """Split names this task has locally."""
        return tuple(self.files)

    @property
    def columns_on_hub(self) -> tuple[str, str | None, str]:
        """``(text, text_pair, label)`` column names in the hub dataset."""
        return self.hub_columns or (self.text_column, self.text_pair_column, self.label_column)


def _glue(name: str, folder: str, text: str, pair: str | None, label: str, names: tuple[str, ...],
          metric: str, hub_columns: tuple[str, str | None, str] | None = None, **extra) -> TaskSpec:
    files = extra.pop("files", {TRAIN: ("train.tsv",), VALIDATION: ("dev.tsv",)})
    return TaskSpec(name=name, folder=folder, files=files, text_column=text, text_pair_column=pair,
                    label_column=label, label_names=names, metric=metric, hub_path="glue", hub_name=name,
                    hub_columns=hub_columns, **extra)


_ENTAILMENT = ("entailment", "not_entailment")

TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    _glue("sst2", "SST-2", "sentence", None, "label", ("negative", "positive"), "accuracy"),
    _glue("cola", "CoLA", "sentence", None, "label", ("unacceptable", "acceptable"), "matthews_corrcoef",
          headerless_columns=("source", "label", "label_notation", "sentence")),
    _glue("mrpc", "MRPC", "#1 String", "#2 String", "Quality", ("not_equivalent", "equivalent"), "f1",
          hub_columns=("sentence1", "sentence2", "label")),
    _glue("rte", "RTE", "sentence1", "sentence2", "label", _ENTAILMENT, "accuracy"),
    _glue("qnli", "QNLI", "question", "sentence", "label", _ENTAILMENT, "accuracy"),
    _glue("mnli", "MNLI", "sentence1", "sentence2", "gold_label", ("entailment", "neutral", "contradiction"),
          "accuracy", hub_columns=("premise", "hypothesis", "label"),
          files={TRAIN: ("train.tsv",), VALIDATION: ("dev_matched.tsv",),
                 "validation_mismatched": ("dev_mismatched.tsv",)},
          hub_splits={VALIDATION: "validation_matched"}),
    _glue("qqp", "QQP", "question1", "question2", "is_duplicate", ("not_duplicate", "duplicate"), "f1",
          hub_columns=("question1", "question2", "label")),
    _glue("stsb", "STS-B", "sentence1", "sentence2", "score", (), "pearson_spearman",
          hub_columns=("sentence1", "sentence2", "label")),
    TaskSpec(name="agnews", folder="agnews", text_column="text", label_column="label",
             files={TRAIN: ("train_subset.tsv", "train.tsv"), VALIDATION: ("dev.tsv", "test.tsv")},
             label_names=("World", "Sports", "Business", "Sci/Tech"), metric="accuracy",
             hub_path="fancyzhx/ag_news", hub_name=None, hub_splits={VALIDATION: "test"},
             quoting=csv.QUOTE_MINIMAL),
)}


def canonical_task_name(name: str) -> str:
    """Registry key for a task name as people write it: ``"SST-2"``, ``"sts_b"``, ``"ag_news"``."""
    return name.lower().replace("-", "").replace("_", "").replace(" ", "")


def get_task(name: str) -> TaskSpec:
    """Look a task up by name (case and ``-``/``_`` ignored); :class:`DataError` lists the known ones."""
    key = canonical_task_name(name)
    if key not in TASKS:
        raise DataError(f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[key]


def canonical_split(spec: TaskSpec, split: str) -> str:
    """Split name in ``spec.files`` for ``split`` (``"dev"`` -> ``"validation"``); raises if absent."""
    key = SPLIT_ALIASES.get(split, split)
    if key not in spec.files:
        raise DataError(f"task {spec.name!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    return key
