"""Instruction data for causal-LM fine-tuning, in the formats people have.

:func:`load_instructions` reads a local .jsonl/.json/.csv/.tsv/.parquet file or a ``hub:owner/name`` dataset
into a :class:`~fedlora.data.dataset.TextDataset` whose ``texts`` are the user messages and ``text_pairs``
the responses. The format is found from the columns (:data:`FORMATS`):

* Alpaca: ``instruction``, optional ``input``, ``output``;
* Dolly: ``instruction``, optional ``context``, ``response``;
* plain: ``prompt`` and ``response`` (or the columns given).

A user message is the instruction, then the input (or context) after a blank line when there is one.
:func:`format_prompts` turns messages into prompts: the tokenizer's chat template when it has one, else the
plain template :data:`PLAIN_TEMPLATE`. ``labels`` are all 0 (one pseudo-class) unless a label column names
a kind per example (then partitions can skew kinds across clients); ``num_labels`` is 0 and the metric is
``perplexity``. Tokenize with :func:`~fedlora.data.tokenize.encode_instructions`, which masks the prompt out
of the loss.

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
FORMATS = {  # name -> (instruction column, optional input column, response column)
    "alpaca": ("instruction", "input", "output"),
    "dolly": ("instruction", "context", "response"),
    "plain": ("prompt", None, "response"),
}
PLAIN_TEMPLATE = "### Instruction:\n{message}\n\n### Response:\n"
TEMPLATES = ("auto", "chat", "plain", "none")


def uses_chat_template(tokenizer, template: str) -> bool:
    """Whether prompts go through the tokenizer's chat template (which writes its own special tokens, BOS
    included, so the prompt is then tokenized without adding them again)."""
    return template == "chat" or (template == "auto" and bool(getattr(tokenizer, "chat_template", None)))


def format_prompts(messages, tokenizer, template: str = "auto") -> list[str]:
    """Prompts from user messages: ``chat`` (the tokenizer's chat template, a generation prompt added),
    ``plain`` (:data:`PLAIN_TEMPLATE`), ``none`` (verbatim) or ``auto`` (chat if the tokenizer has one)."""
    if template not in TEMPLATES:
        raise ValueError(f"data.prompt_template: expected one of {', '.join(TEMPLATES)}, got {template!r}")
    if template == "chat" and not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.prompt_template=chat: this tokenizer has no chat template (use plain)")
    if template == "none":
        return list(messages)
    if uses_chat_template(tokenizer, template):
        return [tokenizer.apply_chat_template([{"role": "user", "content": m}], tokenize=False,
                                              add_generation_prompt=True) for m in messages]
    return [PLAIN_TEMPLATE.format(message=m) for m in messages]


def _format_of(columns, prompt_column: str | None, response_column: str | None, where) -> tuple:
    if prompt_column or response_column:
        return prompt_column or "prompt", None, response_column or "response"
    for instruction, extra, response in FORMATS.values():
        if instruction in columns and response in columns:
            return instruction, extra if extra in columns else None, response
    raise DataError(f"{where}: no instruction format found in columns {sorted(columns)[:8]}; expected "
                    + "; ".join(f"{k}: {i}, {r}" for k, (i, _, r) in FORMATS.items())
                    + " (or set data.text_column and data.text_pair_column)")


def load_instructions(source: str | Path, prompt_column: str | None = None, response_column: str | None = None,
                      split: str = "train", config: str | None = None, max_examples: int | None = None,
                      seed: int = 0, label_column: str | None = None) -> TextDataset:
    """Load prompt/response pairs from a local file or a hub dataset.

    Parameters
    ----------
    source : str or Path
        A file ending in a supported suffix, or ``hub:owner/name``.
    prompt_column, response_column : str or None (default: None)
        The prompt and response columns; None finds the format (:data:`FORMATS`) from the columns.
    split : str (default: "train")
        Hub split (``dev``/``validation`` fall back to each other, then ``test``); ignored for a file.
    config : str or None (default: None)
        Hub dataset configuration name.
    max_examples : int or None (default: None)
        Keep a seeded random subset of at most this many examples.
    seed : int (default: 0)
        Seed of that subset.
    label_column : str or None (default: None)
        A column naming each example's kind (its values become the labels, for skewed partitions).

    Returns
    -------
    TextDataset
        ``texts`` = user messages, ``text_pairs`` = responses, labels (0, or the label column's kinds),
        ``num_labels`` 0, metric ``perplexity``.
    """
    source = str(source)
    if source.startswith(HUB_PREFIX):
        dataset_id = source.removeprefix(HUB_PREFIX)
        columns, _ = _hub_columns(dataset_id, config, split, response_column or "response")
        where = _hub_where(dataset_id, config, split)
    elif Path(source).suffix.lower() in SUFFIXES:
        columns, where = read_table(source), source
    else:
        raise DataError(f"{source!r}: instruction data must be a file ending in {', '.join(SUFFIXES)} "
                        f"or {HUB_PREFIX}owner/name")
    instruction, extra, response = _format_of(columns, prompt_column, response_column, where)
    require_columns(columns, [instruction, response] + ([label_column] if label_column else []), where)
    prompts, responses = _as_texts(columns[instruction]), _as_texts(columns[response])
    if extra is not None:
        prompts = [p if not x.strip() else f"{p}\n\n{x}" for p, x in zip(prompts, _as_texts(columns[extra]))]
    if not prompts:
        raise DataError(f"{where}: no examples")
    labels, names = np.zeros(len(prompts), dtype=np.int64), ()
    if label_column:
        names, labels = np.unique(np.asarray(_as_texts(columns[label_column])), return_inverse=True)
        names, labels = tuple(str(n) for n in names), labels.astype(np.int64)
    dataset = TextDataset(texts=prompts, text_pairs=responses, labels=labels,
                          label_names=names, num_labels=0, metric=PERPLEXITY, task=source)
    return subsample(dataset, max_examples, seed)
