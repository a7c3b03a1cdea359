"""Text datasets for federated fine-tuning: GLUE and AG News by name, local files, any hub dataset.

``load_task("sst2", data_dir, split)`` reads a GLUE-layout folder (or ``$FEDLORA_DATA_DIR``, else the hub);
``load_local`` / ``load_hub`` / ``load_source`` cover other data; ``compute_metric`` scores predictions
with the task's GLUE metric; ``encode`` / ``EncodedDataset`` + ``collate`` / ``encode_instructions`` make
model inputs; ``load_instructions`` reads prompt/response pairs for causal LMs. Partitioning across
clients lives in :mod:`fedlora.partition`.
"""

from .dataset import TextDataset, encode_labels, subsample
from .errors import DataError, DataFileNotFoundError
from .instructions import PERPLEXITY, load_instructions
from .loading import DATA_DIR_ENV, load_hub, load_local, load_source, load_task, resolve_data_dir, task_file
from .metrics import METRICS, compute_metric, primary_score, score_name
from .readers import read_table
from .tasks import TASKS, TaskSpec, get_task
from .tokenize import IGNORE_INDEX, EncodedDataset, collate, encode, encode_instructions

__all__ = [
    "DATA_DIR_ENV",
    "IGNORE_INDEX",
    "METRICS",
    "PERPLEXITY",
    "TASKS",
    "DataError",
    "DataFileNotFoundError",
    "EncodedDataset",
    "TaskSpec",
    "TextDataset",
    "collate",
    "compute_metric",
    "encode",
    "encode_instructions",
    "encode_labels",
    "get_task",
    "load_hub",
    "load_instructions",
    "load_local",
    "load_source",
    "load_task",
    "primary_score",
    "score_name",
    "read_table",
    "resolve_data_dir",
    "subsample",
    "task_file",
]
