"""``lora.target_modules`` presets by model family (a table, not a guess) and one line for an absent layer."""

from __future__ import annotations

import pytest
import torch
from transformers import (BertConfig, BertForSequenceClassification, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

from fedlora.adapters import resolve_targets
from fedlora.config import LoraSection


def _llama():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32))


def _gpt2():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32))


def _bert():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))


@pytest.mark.parametrize("build, presets, wrapped", [
    (_llama, ["attention", "mlp"], {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}),
    (_gpt2, ["attention", "mlp"], {"attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"}),
    (_bert, ["attention"], {"query", "key", "value", "attention.output.dense"}),
])
def test_presets_wrap_exactly_the_family_layers(build, presets, wrapped):
    from fedlora.adapters import attach_lora

    model = build()
    targets = resolve_targets(model, presets)
    assert set(targets) == wrapped
    task = "causal_lm" if not isinstance(model, BertForSequenceClassification) else "seq_cls"
    peft_model = attach_lora(model, LoraSection(rank=2, alpha=4, target_modules=presets), task)
    lora_paths = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    layers = 2 * len(wrapped)  # two blocks, every named layer in each
    assert len(lora_paths) == layers
    assert all(any(p.endswith("." + t) for t in wrapped) for p in lora_paths)


def test_an_absent_target_is_one_line_naming_the_layers():
    with pytest.raises(ValueError) as err:
        resolve_targets(_gpt2(), ["q_proj"])
    text = str(err.value)
    assert "'q_proj' matches no layer of this gpt2" in text and "c_attn" in text and "\n" not in text
    with pytest.raises(ValueError, match="no 'mlp' preset for model type"):
        resolve_targets(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["mlp"])


def test_a_model_already_wrapped_by_peft_still_resolves_its_targets():
    """A second adapter (another client rank) is added to a model whose layers PEFT already wrapped."""
    from fedlora.adapters import add_rank_adapter, attach_lora

    lora = LoraSection(rank=4, alpha=8, target_modules=["query", "value"])
    model = attach_lora(_bert(), lora, "seq_cls")
    assert resolve_targets(model.get_base_model(), ["query", "value"]) == ["query", "value"]
    add_rank_adapter(model, lora, "seq_cls", 2)
    assert any(".lora_A." in n and n.endswith("weight") for n, _ in model.named_parameters())


def test_modules_to_save_train_whole_beside_the_head_and_get_no_adapter():
    """``lora.modules_to_save: [pooler]``: PEFT trains BERT's pooler whole beside the classifier, the pooler's
    dense layer gets no adapter even when a target name would match it, and the heads' parameters carry it."""
    from fedlora.adapters import attach_lora, head_parameters

    peft_model = attach_lora(_bert(), LoraSection(rank=2, alpha=4, target_modules=["query", "dense"],
                                                  modules_to_save=["pooler"]), "seq_cls")
    heads = head_parameters(peft_model)
    assert {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"} <= set(heads)
    assert all(p.requires_grad for p in heads.values())
    lora_paths = {n.rsplit(".lora_A", 1)[0] for n, _ in peft_model.named_modules() if n.endswith(".lora_A")}
    assert lora_paths and not any("pooler" in p for p in lora_paths)
    assert any(p.endswith("attention.output.dense") for p in lora_paths)


def test_an_absent_module_to_save_is_one_line():
    from fedlora.adapters import attach_lora

    with pytest.raises(ValueError) as err:
        attach_lora(_bert(), LoraSection(rank=2, alpha=4, modules_to_save=["poolr"]), "seq_cls")
    text = str(err.value)
    assert text.startswith("lora.modules_to_save: 'poolr' matches no module")
    assert "bert" in text and "\n" not in text
