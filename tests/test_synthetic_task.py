"""The generated instruction task (:mod:`fedlora.data.synthetic`): examples, files, tokenizer, tiny models.

The last test is the evidence that the task is learnable: a tiny random GPT-2 goes from ~0 to a high greedy
exact match on unseen dev examples after a few hundred steps of plain PyTorch training on a CPU.
"""

from __future__ import annotations

import json
import os
import string
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora.data import encode_instructions  # noqa: E402
from fedlora.data import synthetic  # noqa: E402
from fedlora.data.synthetic import (  # noqa: E402
    KINDS,
    make_examples,
    make_tiny_causal_lm,
    make_tokenizer,
    write_task,
)

ALL_KINDS = tuple(synthetic.GENERATORS)  # the default KINDS plus the harder add and count
N_POSITIONS = 64


def prompt(example: dict) -> str:
    """The plain Alpaca template (the input block left out when the input is empty)."""
    block = f"### Input:\n{example['input']}\n\n" if example["input"] else ""
    return f"### Instruction:\n{example['instruction']}\n\n{block}### Response:\n"


def expected_output(example: dict) -> str:
    """Each kind's answer, computed another way than the generator does."""
    text, instruction = example["input"], example["instruction"]
    kind = example["kind"]
    if kind == "reverse":
        return "".join(reversed(text))
    if kind == "upper":
        return "".join(string.ascii_uppercase[string.ascii_lowercase.index(c)] for c in text)
    if kind == "sort":
        counts = Counter(text)
        return "".join(c * counts[c] for c in string.ascii_lowercase)
    if kind == "rotate":
        return "".join(text[(i + 1) % len(text)] for i in range(len(text)))
    if kind == "shift":
        return text.translate(str.maketrans(string.ascii_lowercase[:-1], string.ascii_lowercase[1:]))
    if kind == "copy":
        return "".join(c for c in text)
    if kind == "add":
        return str(sum(int(part) for part in text.split(" ")))
    if kind == "count":
        letter = instruction.split(" ")[1]
        return str(sum(c == letter for c in text))
    raise AssertionError(f"no check for kind {kind!r}")


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    return make_tiny_causal_lm(tmp_path_factory.mktemp("synthetic") / "gpt2", family="gpt2", seed=0)


def test_examples_are_deterministic_and_spread_evenly_over_kinds():
    first = make_examples(103, seed=7)
    assert first == make_examples(103, seed=7)
    assert first != make_examples(103, seed=8)
    counts = Counter(e["kind"] for e in first)
    assert set(counts) == set(KINDS) and max(counts.values()) - min(counts.values()) <= 1
    # Shuffled, not in round-robin order.
    assert [e["kind"] for e in first[: len(KINDS)]] != list(KINDS)
    subset = make_examples(40, seed=0, kinds=("add", "count"))
    assert Counter(e["kind"] for e in subset) == {"add": 20, "count": 20}
    assert make_examples(0, seed=0) == []


@pytest.mark.parametrize("kind", ALL_KINDS)
def test_outputs_are_correct_and_short(kind):
    examples = make_examples(300, seed=3, kinds=(kind,))
    tokenizer_length = len  # one token per character
    for example in examples:
        assert set(example) == {"instruction", "input", "output", "kind"}
        assert all(isinstance(v, str) for v in example.values())
        assert example["input"] and example["output"] == expected_output(example), example
        assert len(example["output"]) <= 8
        # The whole training sequence (prompt, output, EOS) fits the tiny models' 64 positions.
        assert tokenizer_length(prompt(example) + example["output"]) + 1 <= N_POSITIONS
    assert len({(e["instruction"], e["input"]) for e in examples}) > 30  # not a handful of repeats


def test_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="unknown"):
        make_examples(5, seed=0, kinds=("reverse", "divide"))
    with pytest.raises(ValueError):
        make_examples(5, seed=0, kinds=())


def test_write_task_writes_disjoint_train_and_dev(tmp_path):
    paths = write_task(tmp_path / "task", n_train=500, n_dev=100, seed=1)
    assert paths == {"train": tmp_path / "task" / "train.jsonl", "dev": tmp_path / "task" / "dev.jsonl"}
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    dev = [json.loads(line) for line in paths["dev"].read_text().splitlines()]
    assert len(train) == 500 and len(dev) == 100
    assert train == make_examples(500, seed=1)
    seen = {(e["instruction"], e["input"]) for e in train}
    assert not any((e["instruction"], e["input"]) in seen for e in dev)
    assert Counter(e["kind"] for e in dev) == {kind: 20 for kind in KINDS}
    assert all(e["output"] == expected_output(e) for e in dev)
    # Deterministic: the same seed writes the same files.
    again = write_task(tmp_path / "again", n_train=500, n_dev=100, seed=1)
    assert again["dev"].read_text() == paths["dev"].read_text()


def test_tokenizer_round_trips_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = make_tokenizer(tmp_path / "tok")
    assert (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token) == (
        "<pad>", "<s>", "</s>", "<unk>")
    assert tokenizer.chat_template is None
    texts = [prompt(e) + e["output"] for e in make_examples(200, seed=0, kinds=ALL_KINDS)]
    texts += [prompt({"instruction": "upper", "input": ""}), "".join(synthetic.CHARACTERS)]
    reloaded = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    assert reloaded.all_special_ids == tokenizer.all_special_ids
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert len(ids) == len(text) and tokenizer.unk_token_id not in ids  # one known token per character
        assert tokenizer.decode(ids) == text
        assert reloaded(text)["input_ids"] == ids and reloaded.decode(ids) == text
    ids = tokenizer("cba")["input_ids"] + [tokenizer.eos_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "cba"
    assert tokenizer("é")["input_ids"] == [tokenizer.unk_token_id]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tiny_model_loads_back(tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = make_tiny_causal_lm(tmp_path / family, family=family, seed=3)
    assert (folder / "model.safetensors").exists()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.config.model_type == family and model.num_parameters() < 200_000
    assert (model.config.pad_token_id, model.config.bos_token_id, model.config.eos_token_id) == (
        tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    batch = tokenizer([prompt(make_examples(1, seed=0)[0])], return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(tokenizer))
    # Seeded: the same seed builds the same weights.
    again = AutoModelForCausalLM.from_pretrained(
        make_tiny_causal_lm(tmp_path / "again", family=family, seed=3))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_size_overrides_and_unknown_family(tmp_path):
    from transformers import AutoConfig

    folder = make_tiny_causal_lm(tmp_path / "wide", family="gpt2", n_embd=32, n_positions=128)
    config = AutoConfig.from_pretrained(folder)
    assert (config.n_embd, config.n_positions, config.n_layer) == (32, 128, 2)
    with pytest.raises(ValueError, match="family"):
        make_tiny_causal_lm(tmp_path / "other", family="bert")


def test_command_line_writes_data_and_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert synthetic.main([str(tmp_path / "run"), "--train", "60", "--dev", "15", "--seed", "2",
                           "--model", "llama"]) == 0
    assert capsys.readouterr().out == ""
    assert len((tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()) == 60
    assert len((tmp_path / "run" / "data" / "dev.jsonl").read_text().splitlines()) == 15
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").config.model_type == "llama"


def exact_match(model, tokenizer, examples: list[dict]) -> float:
    """Greedy decoding, EOS stops; prompts batched by length so no padding is needed."""
    by_length: dict[int, list[dict]] = {}
    for example in examples:
        by_length.setdefault(len(tokenizer(prompt(example))["input_ids"]), []).append(example)
    hits = 0
    model.eval()
    with torch.no_grad():
        for length, group in by_length.items():
            batch = tokenizer([prompt(e) for e in group], return_tensors="pt")
            # An untrained model never stops; stay inside its 64 positions.
            new = min(10, N_POSITIONS - length)
            out = model.generate(**batch, max_new_tokens=new, do_sample=False,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, length:], skip_special_tokens=True)
            hits += sum(answer == e["output"] for answer, e in zip(answers, group))
    model.train()
    return hits / len(examples)


def test_tiny_gpt2_learns_the_task(gpt2_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    paths = write_task(tmp_path / "task", n_train=2000, n_dev=50, seed=0)
    train = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    dev = [json.loads(line) for line in paths["dev"].read_text().splitlines()]
    tokenizer = AutoTokenizer.from_pretrained(gpt2_dir)
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    # Loss on the response and EOS only (the prompt is masked to -100).
    data = encode_instructions([prompt(e) for e in train], [e["output"] for e in train], tokenizer,
                               max_length=N_POSITIONS)
    assert data["input_ids"].shape[1] <= N_POSITIONS

    # On 2 busy cores a second OpenMP thread makes each step ~25x slower (measured); restored after.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        before = exact_match(model, tokenizer, dev)
        steps, batch_size = 600, 32
        torch.manual_seed(0)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
        # Short warmup, then linear decay to 0: the late small steps settle the answers.
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda i: min(1.0, (i + 1) / 20) * (1 - i / steps))
        losses = []
        for _ in range(steps):
            rows = torch.randint(len(train), (batch_size,))
            batch = {name: values[rows] for name, values in data.items()}
            width = int(batch["attention_mask"].sum(1).max())
            loss = model(**{name: values[:, :width] for name, values in batch.items()}).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        after = exact_match(model, tokenizer, dev)
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    print(f"exact match {before:.2f} -> {after:.2f}, loss {losses[0]:.2f} -> {losses[-1]:.3f}, "
          f"{seconds:.1f} s")
    assert before <= 0.1
    assert after >= 0.5, f"exact match after training {after:.2f} (loss {losses[-1]:.3f})"


def test_pretraining_leaves_a_base_that_has_seen_the_tasks_but_cannot_do_them(tmp_path):
    """The demo's base model: after :func:`pretrain` its loss on unseen task examples is far below a random
    model's, yet it answers none of them exactly (what federated LoRA then has to learn)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fedlora.data.instructions import PLAIN_TEMPLATE
    from fedlora.data.synthetic import COPY_LETTERS, pretrain
    from fedlora.sim.generation import generate_answers

    folder = make_tiny_causal_lm(tmp_path / "m")
    random_model = AutoModelForCausalLM.from_pretrained(folder)
    pretrain(folder)
    tokenizer, model = AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder)
    examples = make_examples(40, seed=99, kinds=KINDS)
    prompts = [PLAIN_TEMPLATE.format(message=f"{e['instruction']}\n\n{e['input']}") for e in examples]
    data = encode_instructions(prompts, [e["output"] for e in examples], tokenizer, max_length=N_POSITIONS)

    def loss(m):
        with torch.no_grad():
            return float(m(**data).loss)

    assert loss(model) < 0.5 * loss(random_model)
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=6)
    assert sum(a == e["output"] for a, e in zip(answers, examples)) / len(examples) <= 0.1
    assert set("".join(e["input"] for e in make_examples(200, 1, ("copy",)))) == set(COPY_LETTERS)
