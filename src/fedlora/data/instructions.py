"""Instruction data for causal-LM fine-tuning: a prompt column and a response column, no labels.

:func:`load_instructions` reads a local .jsonl/.json/.csv/.tsv/.parquet file or a ``hub:owner/name`` dataset
into a :class:`~fedlora.data.dataset.TextDataset` whose ``texts`` are the prompts and ``text_pairs`` the
responses; ``labels`` are all 0 (one pseudo-class, so partition and histogram code runs unchanged),
``num_labels`` is 0 and the metric is ``perplexity``. Tokenize with
:func:`~fedlora.data.tokenize.encode_instructions`, which masks the prompt out of the loss.

Example
-------
>>> ds = load_instructions("sums.jsonl", prompt_column="prompt", response_column="response")
>>> ds.texts[0], ds.text_pairs[0], ds.metric
('add 2 and 3:', '5', 'perplexity')
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .dataset import TextDataset, subsample
from .errors import DataError
from .loading import HUB_PREFIX, _as_texts, _hub_columns, _hub_where
from .readers import SUFFIXES, read_table, require_columns

PERPLEXITY = "perplexity"


def load_instructions(source: str | Path, prompt_column: str = "prompt", response_column: str = "response",
                      split: str = "train", config: str | None = None, max_examples: int | None = None,
                      seed: int = 0) -> TextDataset:
    """Load prompt/response pairs from a local file or a hub dataset.

    Parameters
    ----------
    source : str or Path
        A file ending in a supported suffix, or ``hub:owner/name``.
    prompt_column : str (default: "prompt")
        Column of the prompt (instruction and input), masked out of the loss.
    response_column : str (default: "response")
        Column of the target text.
    split : str (default: "train")
        Hub split (``dev``/``validation`` fall back to each other, then ``test``); ignored for a file.
    config : str or None (default: None)
        Hub dataset configuration name.
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples.
    seed : int (default: 0)
        Seed of that subset.

    Returns
    -------
    TextDataset
        ``texts`` = prompts, ``text_pairs`` = responses, labels all 0, ``num_labels`` 0, metric
        ``perplexity``.
    """
    source = str(source)
    if source.startswith(HUB_PREFIX):
        dataset_id = source.removeprefix(HUB_PREFIX)
        columns, _ = _hub_columns(dataset_id, config, split, response_column)
        where = _hub_where(dataset_id, config, split)
    elif Path(source).suffix.lower() in SUFFIXES:
        columns, where = read_table(source), source
    else:
        raise DataError(f"{source!r}: instruction data must be a file ending in {', '.join(SUFFIXES)} "
                        f"or {HUB_PREFIX}owner/name")
    require_columns(columns, [prompt_column, response_column], where)
    prompts, responses = _as_texts(columns[prompt_column]), _as_texts(columns[response_column])
    if not prompts:
        raise DataError(f"{where}: no examples")
    dataset = TextDataset(texts=prompts, text_pairs=responses, labels=np.zeros(len(prompts), dtype=np.int64),
                          label_names=(), num_labels=0, metric=PERPLEXITY, task=source)
    return subsample(dataset, max_examples, seed)
