"""Generation-based evaluation of a causal LM: greedy answers to dev prompts, exact match and ROUGE-L.

Perplexity says how likely the reference answers are, not whether the model's own answers are right. Each
evaluation here decodes greedily (``do_sample=False``) up to ``max_new_tokens`` for the first ``examples``
dev prompts (formatted exactly as in training), and scores the answers:

* ``exact_match``: the answer equals the reference after stripping and collapsing whitespace;
* ``rouge_l``: the mean ROUGE-L F-measure (Google's ``rouge-score`` package, no stemming).

A few (prompt, reference, answer) samples are written to ``generations/round_NNNN.jsonl`` in the run folder.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

GENERATIONS_DIR = "generations"


def _normal(text: str) -> str:
    return " ".join(text.split())


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], *, max_new_tokens: int, batch_size: int = 32,
                     prompt_special_tokens: bool = True) -> list[str]:
    """Greedy answers (the new tokens only, special tokens dropped) to ``prompts``, left-padded in batches."""
    model.eval()
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right end of every row
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    try:
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start:start + batch_size], return_tensors="pt", padding=True,
                              add_special_tokens=prompt_special_tokens)
            room = _positions(model) - batch["input_ids"].shape[1]  # a model with learned positions stops there
            out = model.generate(**batch, max_new_tokens=max(1, min(max_new_tokens, room)), do_sample=False,
                                 num_beams=1, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            answers += tokenizer.batch_decode(new, skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def _positions(model) -> int:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 1 << 30


def generation_metrics(answers: list[str], references: list[str]) -> dict[str, float]:
    """``exact_match`` and ``rouge_l`` (mean F-measure) of ``answers`` against ``references``."""
    from rouge_score import rouge_scorer, tokenizers

    if len(answers) != len(references) or not answers:
        raise ValueError(f"{len(answers)} answers for {len(references)} references")
    # the tokenizer given explicitly: rouge-score logs "Using default tokenizer." on every scorer otherwise
    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=tokenizers.DefaultTokenizer(use_stemmer=False))
    exact = sum(_normal(a) == _normal(r) for a, r in zip(answers, references)) / len(answers)
    rouge = sum(scorer.score(r, a)["rougeL"].fmeasure for a, r in zip(answers, references)) / len(answers)
    return {"exact_match": float(exact), "rouge_l": float(rouge)}


def write_samples(run_dir: Path, round_number: int, prompts, references, answers, count: int) -> Path:
    """The first ``count`` (prompt, reference, answer) triples of a round, as JSON lines."""
    folder = Path(run_dir) / GENERATIONS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"round_{round_number:04d}.jsonl"
    rows = [{"prompt": p, "reference": r, "answer": a} for p, r, a in list(zip(prompts, references, answers))[:count]]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def evaluate_generation(model, tokenizer, data, eval_cfg, run_dir: Path, round_number: int) -> dict[str, float]:
    """Exact match and ROUGE-L of greedy answers to the first ``eval.generate_examples`` dev prompts of
    ``data`` (a causal-LM :class:`~fedlora.sim.data.FederatedData`); the samples written. Empty when off."""
    n = eval_cfg.generate_examples
    if n == 0:
        return {}
    prompts, refs = data.dev_prompts[:n], list(data.dev_set.text_pairs[:n])
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=eval_cfg.max_new_tokens,
                               batch_size=eval_cfg.batch_size, prompt_special_tokens=data.prompt_special_tokens)
    if eval_cfg.samples:
        write_samples(run_dir, round_number, prompts, refs, answers, eval_cfg.samples)
    return generation_metrics(answers, refs)
