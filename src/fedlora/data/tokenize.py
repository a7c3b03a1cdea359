"""Tokenize a :class:`~fedlora.data.dataset.TextDataset` into model inputs.

Two ways for classifiers: :func:`encode` pads everything at once (to the longest example or to
``max_length``) and returns tensors; :class:`EncodedDataset` keeps examples unpadded and :func:`collate`
pads each batch to its own longest (faster when lengths vary). For causal LMs,
:func:`encode_instructions` builds prompt + response sequences whose loss covers the response only.
Any Hugging Face tokenizer works; fast (Rust) tokenizers batch the work.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .dataset import TextDataset

IGNORE_INDEX = -100  # label value torch's cross-entropy skips


def label_tensor(dataset: TextDataset) -> Tensor:
    """Labels as ``long`` class ids, or ``float32`` scores for regression."""
    return torch.as_tensor(dataset.labels, dtype=torch.float32 if dataset.is_regression else torch.long)


def encode(dataset: TextDataset, tokenizer, max_length: int = 128,
           padding: str = "longest") -> dict[str, Tensor]:
    """Tokenize, truncate and pad a whole dataset.

    Parameters
    ----------
    dataset : TextDataset
        Texts (and text pairs) with labels.
    tokenizer : transformers.PreTrainedTokenizerBase
        Any Hugging Face tokenizer.
    max_length : int (default: 128)
        Truncation length (pairs: longest-first).
    padding : str (default: "longest")
        ``"longest"`` pads to the longest example, ``"max_length"`` to ``max_length``.

    Returns
    -------
    dict of str to Tensor
        ``input_ids``, ``attention_mask`` (``(N, T)``), ``token_type_ids`` when the tokenizer makes them,
        and ``labels`` (``(N,)``).
    """
    batch = tokenizer(dataset.texts, dataset.text_pairs, truncation=True, max_length=max_length,
                      padding=padding, return_tensors="pt")
    return {**batch, "labels": label_tensor(dataset)}


class EncodedDataset(Dataset):
    """Unpadded token ids per example plus labels; batch it with :func:`collate`.

    Parameters
    ----------
    dataset : TextDataset
        Texts (and text pairs) with labels.
    tokenizer : transformers.PreTrainedTokenizerBase
        Any Hugging Face tokenizer.
    max_length : int (default: 128)
        Truncation length.
    """

    def __init__(self, dataset: TextDataset, tokenizer, max_length: int = 128):
        self.features = dict(tokenizer(dataset.texts, dataset.text_pairs, truncation=True,
                                       max_length=max_length))
        self.labels = label_tensor(dataset)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        item = {name: values[index] for name, values in self.features.items()}
        return {**item, "labels": self.labels[index]}


def collate(features: Sequence[dict], pad_token_id: int = 0,
            padding_side: str = "right") -> dict[str, Tensor]:
    """Pad a list of :class:`EncodedDataset` items to the batch's longest sequence.

    Parameters
    ----------
    features : sequence of dict
        Items with ``input_ids`` (and optional ``attention_mask``, ``token_type_ids``) lists and ``labels``.
    pad_token_id : int (default: 0)
        Fill value of ``input_ids``; masks and token types fill with 0. Use ``dataset.pad_token_id``.
    padding_side : str (default: "right")
        ``"right"`` or ``"left"`` (decoder-only models generating from the batch).

    Returns
    -------
    dict of str to Tensor
        Padded ``(B, T)`` tensors and ``labels`` ``(B,)``.

    Examples
    --------
    >>> loader = DataLoader(encoded, batch_size=32, shuffle=True,
    ...                     collate_fn=functools.partial(collate, pad_token_id=encoded.pad_token_id))
    """
    longest = max(len(f["input_ids"]) for f in features)
    batch: dict[str, Tensor] = {}
    for name in (n for n in ("input_ids", "attention_mask", "token_type_ids") if n in features[0]):
        fill = pad_token_id if name == "input_ids" else 0
        rows = [_pad(list(f[name]), longest, fill, padding_side) for f in features]
        batch[name] = torch.tensor(rows, dtype=torch.long)
    batch["labels"] = torch.stack([torch.as_tensor(f["labels"]) for f in features])
    return batch


def encode_instructions(prompts: Sequence[str], responses: Sequence[str], tokenizer, max_length: int = 512,
                        add_eos: bool = True, prompt_special_tokens: bool = True) -> dict[str, Tensor]:
    """Tokenize prompt + response pairs for causal-LM fine-tuning, loss on the response only.

    Prompt and response are tokenized separately and concatenated (so the prompt/response boundary is
    exact), the response ends with EOS if ``add_eos``, the sequence is cut at ``max_length`` from the
    right, and everything is right-padded to the longest sequence. An example whose prompt fills
    ``max_length`` keeps no response tokens and adds nothing to the loss.

    Parameters
    ----------
    prompts : sequence of str
        Instruction (and input) text, masked out of the loss.
    responses : sequence of str
        Target text, trained on.
    tokenizer : transformers.PreTrainedTokenizerBase
        A causal-LM tokenizer; without a pad token, EOS (else 0) pads.
    max_length : int (default: 512)
        Longest sequence kept.
    add_eos : bool (default: True)
        Append the EOS token to each response (if the tokenizer has one).
    prompt_special_tokens : bool (default: True)
        Let the tokenizer add its special tokens (BOS) to the prompt; False when a chat template wrote them.

    Returns
    -------
    dict of str to Tensor
        ``input_ids``, ``attention_mask`` and ``labels`` (``(N, T)``); ``labels`` is ``-100`` on prompt
        tokens and padding, the token id on response tokens.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_ids = tokenizer(list(prompts), add_special_tokens=prompt_special_tokens)["input_ids"]
    response_ids = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    sequences, targets = [], []
    for prompt, response in zip(prompt_ids, response_ids):
        sequences.append((prompt + response + eos)[:max_length])
        targets.append(([IGNORE_INDEX] * len(prompt) + response + eos)[:max_length])
    pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
    longest = max(map(len, sequences), default=0)
    lengths = np.array([len(s) for s in sequences])
    return {
        "input_ids": torch.tensor([_pad(s, longest, pad_id, "right") for s in sequences], dtype=torch.long),
        "attention_mask": torch.as_tensor(np.arange(longest)[None, :] < lengths[:, None], dtype=torch.long),
        "labels": torch.tensor([_pad(t, longest, IGNORE_INDEX, "right") for t in targets], dtype=torch.long),
    }


def _pad(values: list[int], length: int, fill: int, side: str) -> list[int]:
    padding = [fill] * (length - len(values))
    return values + padding if side == "right" else padding + values
