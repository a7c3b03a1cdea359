"""An offline instruction-tuning task, a character-level tokenizer and tiny random causal LMs, all generated.

Nothing here is downloaded or committed: :func:`make_examples` draws Alpaca-style examples from a seed,
:func:`write_task` writes them as ``train.jsonl`` / ``dev.jsonl``, :func:`make_tokenizer` builds a
character-level tokenizer covering every character the task and its prompt template use, and
:func:`make_tiny_causal_lm` saves a tiny random GPT-2 or LLaMA next to that tokenizer. A 2-layer GPT-2 of
width 64 learns the task to a high greedy exact match in a few hundred steps on a CPU
(``tests/test_synthetic_task.py`` checks it: 0.00 -> 0.92 after 600 steps of batch 32). The tiny LLaMA learns
it more slowly (measured 0.16 after 600 steps and 0.20 after 1500, same optimizer).

:data:`KINDS`, the default, are string tasks a tiny model learns in a minute. Every string is 4 letters
from ``a``-``h``: a fixed length puts each answer character at a fixed position relative to its source
character, which a 2-layer model finds fast.

==========  ===========  ==========  ========  ==============================================
kind        instruction  input       output    answer
==========  ===========  ==========  ========  ==============================================
``reverse`` ``reverse``  ``abcd``    ``dcba``  the letters backwards
``upper``   ``upper``    ``abcd``    ``ABCD``  the letters in capitals
``sort``    ``sort``     ``dbca``    ``abcd``  the letters in alphabetical order
``rotate``  ``rotate``   ``abcd``    ``bcda``  the first letter moved to the end
``shift``   ``shift``    ``abch``    ``bcdi``  each letter replaced by the next in the alphabet
==========  ===========  ==========  ========  ==============================================

Two arithmetic kinds are available through ``kinds=`` but are not in the default: a 2-layer model of width
64 does not learn them in a few hundred steps (measured: ``add`` ~0.1, ``count`` ~0.5 exact match after
600 steps, where the default kinds reach ~0.95):

==========  ===========  ==========  ========  ==============================================
``add``     ``add``      ``23 41``   ``64``    the sum of two numbers in 0-49
``count``   ``count a``  ``abac``    ``2``     how often the letter occurs in the input
==========  ===========  ==========  ========  ==============================================

Prompt format (formatted by the caller; this module only generates the fields)::

    ### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n

(the ``### Input`` block is left out when ``input`` is empty), followed by ``output`` and the EOS token
``</s>``. The template alone is 46 characters, so instructions and inputs are kept short enough that the
whole example, EOS included, is at most 62 tokens and a prompt at most 57: the tiny models have 64
positions, so greedy decoding of an untrained model must stop at ``64 - prompt length`` new tokens
(``max_new_tokens=7`` always fits; answers are at most 4 characters and EOS).

Example
-------
>>> example = make_examples(1, seed=0, kinds=("reverse",))[0]
>>> example["output"] == example["input"][::-1], example["kind"]
(True, 'reverse')

Command line: ``python -m fedlora.data.synthetic DIR [--train N] [--dev N] [--seed S] [--model gpt2|llama]``
writes ``DIR/data/{train,dev}.jsonl`` and ``DIR/model/`` (tokenizer and tiny model).
"""

from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

KINDS = ("reverse", "upper", "sort", "rotate", "shift")

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Every printable ASCII character but tab/CR/VT/FF, plus newline: covers the generator, the template and
# small edits to either.
CHARACTERS = tuple(string.ascii_letters + string.digits + string.punctuation + " \n")

LETTERS = "abcdefgh"  # a small alphabet: fewer symbols to map, still 4096 strings of 4 letters
LENGTH = 4  # fixed, see the module docstring (lengths 3-5: a third of the exact match after 600 steps)
MAX_ADDEND = 49
DEV_STREAM = 1  # dev examples come from the seed sequence (seed, DEV_STREAM); train from seed alone

# No dropout: examples are fresh draws, and GPT-2's default 0.1 slows a tiny model down (exact match after
# 600 steps measured 0.74 with it, 0.95 without).
GPT2_SIZE = {"n_layer": 2, "n_embd": 64, "n_head": 4, "n_positions": 64,
             "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
LLAMA_SIZE = {"num_hidden_layers": 2, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4,
              "num_key_value_heads": 2, "max_position_embeddings": 64}


@contextmanager
def _no_progress_bars():
    """transformers draws progress bars on load and save; library code stays quiet, the caller's setting returns."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def _letters(rng: np.random.Generator) -> str:
    return "".join(LETTERS[i] for i in rng.integers(len(LETTERS), size=LENGTH))


def _add(rng: np.random.Generator) -> tuple[str, str, str]:
    a, b = (int(v) for v in rng.integers(MAX_ADDEND + 1, size=2))
    return "add", f"{a} {b}", str(a + b)


def _reverse(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    return "reverse", text, text[::-1]


def _upper(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    return "upper", text, text.upper()


def _sort(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    return "sort", text, "".join(sorted(text))


def _rotate(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    return "rotate", text, text[1:] + text[:1]


def _shift(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    return "shift", text, "".join(chr(ord(c) + 1) for c in text)


COPY_LETTERS = LETTERS + "i" + LETTERS.upper()  # every character an answer of KINDS can contain


def _copy(rng: np.random.Generator) -> tuple[str, str, str]:
    text = "".join(COPY_LETTERS[i] for i in rng.integers(len(COPY_LETTERS), size=LENGTH))
    return "copy", text, text


def _count(rng: np.random.Generator) -> tuple[str, str, str]:
    text = _letters(rng)
    # Half the time count a letter that occurs, else any letter: answers span 0..len instead of mostly 0/1.
    pool = text if rng.random() < 0.5 else LETTERS
    letter = pool[int(rng.integers(len(pool)))]
    return f"count {letter}", text, str(text.count(letter))


# kind -> draw(rng) -> (instruction, input, output); KINDS first, then the harder kinds outside the default.
GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str, str]]] = {
    "reverse": _reverse, "upper": _upper, "sort": _sort, "rotate": _rotate, "shift": _shift,
    "add": _add, "count": _count, "copy": _copy,
}
PRETRAIN_KINDS = ("copy", *KINDS)  # what the base model has seen before federated tuning (briefly)


def _draw(n: int, rng: np.random.Generator, kinds: Sequence[str],
          exclude: set[tuple[str, str]] | None = None) -> list[dict]:
    """``n`` examples, kinds in equal shares (round-robin, then shuffled), none whose (instruction, input) is
    in ``exclude``."""
    kinds = tuple(kinds)
    unknown = [k for k in kinds if k not in GENERATORS]
    if unknown or not kinds:
        raise ValueError(f"unknown or no kinds {unknown or kinds!r}; choose from {', '.join(GENERATORS)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    slots = [kinds[i % len(kinds)] for i in range(n)]
    slots = [slots[i] for i in rng.permutation(n)]
    examples = []
    for kind in slots:
        for _ in range(10_000):  # redraw the same kind, so excluding keeps the shares equal
            instruction, text, output = GENERATORS[kind](rng)
            if exclude is None or (instruction, text) not in exclude:
                break
        else:
            raise ValueError(f"could not draw a {kind!r} example outside the excluded set")
        examples.append({"instruction": instruction, "input": text, "output": output, "kind": kind})
    return examples


def make_examples(n: int, seed: int, kinds: Sequence[str] = KINDS) -> list[dict]:
    """Draw ``n`` synthetic instruction examples, deterministic in ``seed``.

    Parameters
    ----------
    n : int
        Number of examples.
    seed : int
        Seed of the draw (the same seed and kinds give the same list).
    kinds : sequence of str (default: KINDS)
        Task types; ``n`` is split over them as evenly as possible, in a shuffled order.

    Returns
    -------
    list of dict
        ``{"instruction", "input", "output", "kind"}`` strings, Alpaca style.
    """
    return _draw(n, np.random.default_rng(seed), kinds)


def _write_jsonl(path: Path, examples: list[dict]) -> Path:
    with path.open("w") as handle:
        for example in examples:
            handle.write(json.dumps(example) + "\n")
    return path


def write_task(folder: Path, n_train: int = 2000, n_dev: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write ``folder/train.jsonl`` and ``folder/dev.jsonl``, one example (JSON object) per line.

    Dev is drawn from another seed stream than train, and no dev example has the instruction and input of a
    train example (so dev exact match measures generalization, not recall).

    Returns
    -------
    dict of str to Path
        ``{"train": path, "dev": path}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    train = make_examples(n_train, seed)
    seen = {(e["instruction"], e["input"]) for e in train}
    dev = _draw(n_dev, np.random.default_rng((seed, DEV_STREAM)), KINDS, exclude=seen)
    return {"train": _write_jsonl(folder / "train.jsonl", train),
            "dev": _write_jsonl(folder / "dev.jsonl", dev)}


def make_tokenizer(folder: Path):
    """Build a character-level tokenizer (one token per character), save it to ``folder`` and return it.

    The vocabulary is the special tokens ``<pad>`` (0), ``<s>`` (1), ``</s>`` (2), ``<unk>`` (3), then
    :data:`CHARACTERS`. No special tokens are added on encoding (no BOS, for either model family), so
    ``decode(encode(s)) == s``; EOS ends a response only where the caller appends it.

    Returns
    -------
    transformers.PreTrainedTokenizerFast
        With pad, bos, eos and unk tokens set; ``AutoTokenizer.from_pretrained(folder)`` loads it back.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Every character its own piece, newline included ("." would skip it).
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()  # join pieces with nothing between (WordLevel's default adds spaces)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS,
                                        unk_token=UNK, clean_up_tokenization_spaces=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    return tokenizer


def make_tiny_causal_lm(folder: Path, family: str = "gpt2", seed: int = 0, **size) -> Path:
    """Save a tiny random causal LM and its character-level tokenizer in ``folder`` (safetensors).

    Parameters
    ----------
    folder : Path
        Output folder; ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained(folder)`` load it.
    family : str (default: "gpt2")
        ``gpt2`` (:data:`GPT2_SIZE`: 2 layers, width 64, 4 heads, 64 positions) or ``llama``
        (:data:`LLAMA_SIZE`: 2 layers, width 64, MLP 128, 4 heads, 2 key/value heads, 64 positions).
    seed : int (default: 0)
        ``torch.manual_seed`` before the weights are initialized.
    **size
        Config fields overriding the defaults (for example ``n_layer=1``).

    Returns
    -------
    Path
        ``folder``.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    folder = Path(folder)
    tokenizer = make_tokenizer(folder)
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if family == "gpt2":
        config, model_class = GPT2Config(**{**GPT2_SIZE, **size, **ids}), GPT2LMHeadModel
    elif family == "llama":
        config, model_class = LlamaConfig(**{**LLAMA_SIZE, **size, **ids}), LlamaForCausalLM
    else:
        raise ValueError(f"unknown family {family!r}; choose gpt2 or llama")
    torch.manual_seed(seed)
    model = model_class(config)
    with _no_progress_bars():
        model.save_pretrained(folder)
    return folder


def pretrain(folder: Path, steps: int = 150, seed: int = 0, kinds: Sequence[str] = PRETRAIN_KINDS,
             lr: float = 3e-3, batch_size: int = 32) -> Path:
    """Train the whole tiny model in ``folder`` briefly on ``kinds`` (default: copying, and the tasks), in place.

    The small-scale analogue of a pretrained model that has seen text like the task but cannot do it yet.
    Measured on the tiny GPT-2 (one thread): from random weights, federated LoRA left exact match at 0 after 8
    rounds, and centralized LoRA reached at most 0.06 in 750 steps, even from a base that copies perfectly
    (1,500 steps on copying alone). After 150 steps on copying and the tasks the base answers none of them
    (exact match 0.00; 250 steps already give 0.60), and centralized LoRA then reaches 0.80 in 300 steps.
    The prompts are fedlora's plain template (:data:`fedlora.data.instructions.PLAIN_TEMPLATE`). Seeded.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .instructions import PLAIN_TEMPLATE
    from .tokenize import encode_instructions

    folder = Path(folder)
    with _no_progress_bars():
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder)
    examples = make_examples(20 * batch_size, seed + 1000, kinds)
    prompts = [PLAIN_TEMPLATE.format(message=f"{e['instruction']}\n\n{e['input']}") for e in examples]
    data = encode_instructions(prompts, [e["output"] for e in examples], tokenizer, max_length=64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: a second thread on a busy machine only adds contention
    try:
        generator = torch.Generator().manual_seed(seed)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
        model.train()
        for _ in range(steps):
            rows = torch.randint(len(examples), (batch_size,), generator=generator)
            batch = {name: values[rows] for name, values in data.items()}
            width = int(batch["attention_mask"].sum(1).max())
            loss = model(**{name: values[:, :width] for name, values in batch.items()}).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    finally:
        torch.set_num_threads(threads)
    with _no_progress_bars():
        model.save_pretrained(folder)
    return folder


def main(argv: Sequence[str] | None = None) -> int:
    """Write ``DIR/data/{train,dev}.jsonl`` and ``DIR/model/`` (tokenizer and tiny random model)."""
    parser = argparse.ArgumentParser(prog="python -m fedlora.data.synthetic", description=main.__doc__)
    parser.add_argument("dir", type=Path, help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="training examples (default: 2000)")
    parser.add_argument("--dev", type=int, default=200, help="dev examples (default: 200)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the examples and the weights (default: 0)")
    parser.add_argument("--model", choices=("gpt2", "llama"), default="gpt2",
                        help="model family (default: gpt2)")
    parser.add_argument("--pretrain-steps", type=int, default=150,
                        help="full training steps on the tasks before any federated tuning (default: 150)")
    args = parser.parse_args(argv)
    write_task(args.dir / "data", n_train=args.train, n_dev=args.dev, seed=args.seed)
    make_tiny_causal_lm(args.dir / "model", family=args.model, seed=args.seed)
    if args.pretrain_steps:
        pretrain(args.dir / "model", steps=args.pretrain_steps, seed=args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
