"""Step FLOPs and block lookup against PyTorch's own FLOP counter on tiny random models.

The reference is ``torch.utils.flop_counter.FlopCounterMode`` around a real forward and ``loss.backward()``
with ``requires_grad`` set (by this file's own name patterns) on the LoRA factors of the top ``depth``
blocks and the classifier head only. Attention is eager: with ``sdpa`` on CPU the counter sees the fused
kernel as 0 FLOPs. All sequences are full length (attention mask of ones).
"""

from __future__ import annotations

import re

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.flop_counter import FlopCounterMode
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
)

from fedlora.flops import ModelCost, block_index, top_blocks, transformer_blocks

REL = 0.10  # the contract; the count is exact today for all three models
BATCH, LENGTH = 3, 12  # not the probe's 7 tokens


def bert():
    torch.manual_seed(0)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                     vocab_size=200, max_position_embeddings=64, num_labels=3, attn_implementation="eager")
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"])
    return get_peft_model(BertForSequenceClassification(cfg), lora)


def gpt2():
    torch.manual_seed(0)
    cfg = GPT2Config(n_embd=64, n_layer=3, n_head=4, vocab_size=200, n_positions=64, num_labels=3,
                     pad_token_id=0, bos_token_id=1, eos_token_id=1, attn_implementation="eager")
    lora = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True)
    return get_peft_model(GPT2ForSequenceClassification(cfg), lora)


def llama(peft: bool = True):
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=128, vocab_size=200, attn_implementation="eager")
    model = LlamaForCausalLM(cfg)
    if not peft:
        return model
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=4, lora_alpha=8,
                                            target_modules=["q_proj", "v_proj"]))


# model factory, its number of blocks, the regex giving a parameter's block
MODELS = {
    "bert": (bert, 4, r"\.encoder\.layer\.(\d+)\."),
    "gpt2": (gpt2, 3, r"\.transformer\.h\.(\d+)\."),
    "llama": (llama, 2, r"\.model\.layers\.(\d+)\."),
}


@pytest.fixture(scope="module")
def built():
    """Each model with its ModelCost, read in PEFT's own state (every LoRA factor and the head train)."""
    out = {}
    for key, (factory, blocks, pattern) in MODELS.items():
        model = factory()
        out[key] = (model, ModelCost.from_model(model), blocks, pattern)
    return out


def measure(model, blocks: int, pattern: str, depth: int, batch: int = BATCH,
            length: int = LENGTH) -> tuple[float, float]:
    """FlopCounterMode's (forward, forward + backward) FLOPs of one step at ``depth``."""
    for name, p in model.named_parameters():
        block = re.search(pattern, name)
        lora = ".lora_" in name and block is not None and int(block.group(1)) >= blocks - depth
        p.requires_grad_(lora or "modules_to_save" in name)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 200, (batch, length), generator=gen)
    is_lm = isinstance(model.get_base_model(), LlamaForCausalLM)
    labels = ids if is_lm else torch.randint(0, 3, (batch,), generator=gen)
    counts = []
    for backward in (False, True):
        counter = FlopCounterMode(display=False)
        with counter:
            loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            if backward and loss.requires_grad:  # a causal LM at depth 0 trains nothing
                loss.backward()
        counts.append(float(counter.get_total_flops()))
    model.zero_grad(set_to_none=True)
    return counts[0], counts[1]


def check_depths(model, cost: ModelCost, blocks: int, pattern: str, depths) -> None:
    totals, predicted = [], []
    for depth in depths:
        forward, total = measure(model, blocks, pattern, depth)
        step = cost.step(BATCH, LENGTH, depth)
        assert step.forward == pytest.approx(forward, rel=REL), f"forward at depth {depth}"
        assert step.total == pytest.approx(total, rel=REL), f"forward + backward at depth {depth}"
        totals.append(total)
        predicted.append(step.total)
    for i in range(1, len(depths)):
        assert predicted[i] > predicted[i - 1]
        # each extra block's cost tracks the counter's
        assert predicted[i] - predicted[i - 1] == pytest.approx(totals[i] - totals[i - 1], rel=REL)


def test_bert_every_depth(built):
    model, cost, blocks, pattern = built["bert"]
    assert cost.num_blocks == 4
    check_depths(model, cost, blocks, pattern, range(blocks + 1))
    assert cost.step(BATCH, LENGTH).total == cost.step(BATCH, LENGTH, blocks).total


def test_gpt2_conv1d(built):
    model, cost, blocks, pattern = built["gpt2"]
    check_depths(model, cost, blocks, pattern, [0, 1, blocks])


def test_llama_causal_lm(built):
    model, cost, blocks, pattern = built["llama"]
    check_depths(model, cost, blocks, pattern, [0, 1, blocks])


def test_bert_other_shapes(built):
    model, cost, blocks, pattern = built["bert"]
    for batch, length in [(1, 30), (5, 3)]:  # attention ~ T^2 and the head ~ batch weigh differently
        _, total = measure(model, blocks, pattern, blocks, batch, length)
        assert cost.step(batch, length, blocks).total == pytest.approx(total, rel=REL)


def test_from_model_leaves_the_model_as_it_was():
    model = bert()
    model.train()
    query = model.get_base_model().bert.encoder.layer[0].attention.self.query
    query.lora_A["default"].weight.requires_grad_(False)  # a frozen A (FFA-LoRA) must stay frozen
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.random.get_rng_state()
    ModelCost.from_model(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert torch.equal(torch.random.get_rng_state(), rng)


def test_memory_grows_with_depth_and_batch(built):
    for model, cost, blocks, _ in built.values():
        weights = sum(p.numel() * p.element_size() for p in model.parameters())
        by_depth = [cost.memory_bytes(4, 16, d) for d in range(blocks + 1)]
        assert by_depth[0] >= weights
        assert all(b > a for a, b in zip(by_depth, by_depth[1:], strict=False))
        for depth in range(1, blocks + 1):
            assert cost.memory_bytes(8, 16, depth) > cost.memory_bytes(4, 16, depth)


def test_step_rejects_bad_input(built):
    cost = built["bert"][1]
    with pytest.raises(ValueError, match="depth"):
        cost.step(2, 8, 5)
    with pytest.raises(ValueError, match="batch_size"):
        cost.step(0, 8)
    with pytest.raises(ValueError, match="seq_len"):
        cost.memory_bytes(2, 0.0)


def test_transformer_blocks(built):
    bert_model, gpt2_model = built["bert"][0], built["gpt2"][0]
    plain = llama(peft=False)
    for model, name, count in [(bert_model, "base_model.model.bert.encoder.layer", 4),
                               (gpt2_model, "base_model.model.transformer.h", 3),
                               (plain, "model.layers", 2)]:
        found, blocks = transformer_blocks(model)
        assert found == name and len(blocks) == count
        assert all(b is model.get_submodule(name)[i] for i, b in enumerate(blocks))


def test_block_index(built):
    bert_model, gpt2_model = built["bert"][0], built["gpt2"][0]
    got = block_index(bert_model, ["base_model.model.bert.encoder.layer.2.attention.self.query",
                                   "bert.encoder.layer.3.output.dense", "bert.encoder.layer.0",
                                   "bert.encoder.layer.1.attention.self.value.lora_B.default"])
    assert list(got.values()) == [2, 3, 0, 1]
    names = ["transformer.h.1.attn.c_attn", "base_model.model.transformer.h.2.mlp.c_fc"]
    assert block_index(gpt2_model, names) == {names[0]: 1, names[1]: 2}
    plain = llama(peft=False)
    assert block_index(plain, ["model.layers.1.mlp.down_proj", "model.layers.0.self_attn.k_proj"]) == {
        "model.layers.1.mlp.down_proj": 1, "model.layers.0.self_attn.k_proj": 0}
    for model, head in [(bert_model, "base_model.model.classifier"), (bert_model, "bert.pooler.dense"),
                        (gpt2_model, "score"), (gpt2_model, "transformer.wte"), (plain, "lm_head"),
                        (bert_model, "bert.encoder.layer")]:
        with pytest.raises(ValueError, match=re.escape(repr(head))):
            block_index(model, [head])


def test_top_blocks():
    assert top_blocks(4, 2) == range(2, 4)
    assert list(top_blocks(4, 0)) == [] and list(top_blocks(4, 4)) == [0, 1, 2, 3]
    for bad in (-1, 5):
        with pytest.raises(ValueError, match="depth"):
            top_blocks(4, bad)
