"""Instruction data in the formats people have (Alpaca, Dolly, prompt/response), kinds as labels, and the
prompt templates (chat template when the tokenizer has one, the documented plain template otherwise)."""

from __future__ import annotations

import json

import pytest

from fedlora.data import load_instructions
from fedlora.data.errors import DataError
from fedlora.data.instructions import PLAIN_TEMPLATE, format_prompts


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_alpaca_dolly_and_plain_are_found_from_the_columns(tmp_path):
    alpaca = _jsonl(tmp_path / "a.jsonl", [{"instruction": "reverse", "input": "abc", "output": "cba"},
                                           {"instruction": "say hi", "input": "", "output": "hi"}])
    ds = load_instructions(alpaca)
    assert ds.texts == ["reverse\n\nabc", "say hi"] and ds.text_pairs == ["cba", "hi"]
    dolly = _jsonl(tmp_path / "d.jsonl", [{"instruction": "sum", "context": "2 3", "response": "5"}])
    ds = load_instructions(dolly)
    assert ds.texts == ["sum\n\n2 3"] and ds.text_pairs == ["5"]
    plain = _jsonl(tmp_path / "p.jsonl", [{"prompt": "add 2 and 3:", "response": "5"}])
    assert load_instructions(plain).texts == ["add 2 and 3:"]
    custom = _jsonl(tmp_path / "c.jsonl", [{"q": "why?", "a": "because"}])
    ds = load_instructions(custom, prompt_column="q", response_column="a")
    assert (ds.texts, ds.text_pairs) == (["why?"], ["because"])


def test_unknown_columns_are_one_line_naming_the_formats(tmp_path):
    path = _jsonl(tmp_path / "x.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as err:
        load_instructions(path)
    assert "alpaca: instruction, output" in str(err.value) and "\n" not in str(err.value)


def test_a_kind_column_becomes_the_labels(tmp_path):
    path = _jsonl(tmp_path / "k.jsonl", [{"instruction": "i", "output": "o", "kind": k} for k in ("b", "a", "b")])
    ds = load_instructions(path, label_column="kind")
    assert ds.label_names == ("a", "b") and ds.labels.tolist() == [1, 0, 1] and ds.num_labels == 0


def test_templates(assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(assets[0])
    assert format_prompts(["do it"], tokenizer, "auto") == [PLAIN_TEMPLATE.format(message="do it")]
    assert PLAIN_TEMPLATE.format(message="do it") == "### Instruction:\ndo it\n\n### Response:\n"
    assert format_prompts(["do it"], tokenizer, "none") == ["do it"]
    with pytest.raises(ValueError, match="no chat template"):
        format_prompts(["do it"], tokenizer, "chat")
    tokenizer.chat_template = ("{% for m in messages %}<u>{{ m['content'] }}</u>{% endfor %}"
                               "{% if add_generation_prompt %}<a>{% endif %}")
    assert format_prompts(["do it"], tokenizer, "auto") == ["<u>do it</u><a>"]
    assert format_prompts(["do it"], tokenizer, "plain") == [PLAIN_TEMPLATE.format(message="do it")]
