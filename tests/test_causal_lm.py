"""Causal-LM federations end to end on tiny random GPT-2 (Conv1D) and LLaMA (Linear) models, offline.

Instruction data ("add 2 and 3:" -> "5") with the prompt masked out of the loss; dev metric perplexity.
The tokenizer is a word-level one built from the synthetic vocabulary (no network).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from fedlora import adapters  # noqa: E402
from fedlora.config import load_config  # noqa: E402
from fedlora.sim.client import batch_at  # noqa: E402

WORDS = ["add", "and", ":"] + [str(i) for i in range(19)]


def _tokenizer(bos: bool):
    """Word-level tokenizer: GPT-2 style (one special token, no BOS, no pad) or LLaMA style (BOS added)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>"] if bos else ["<|endoftext|>"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    eot = "<|endoftext|>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=eot, eos_token=eot, unk_token=eot)


def make_tiny_gpt2(folder: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _tokenizer(bos=False)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=32, n_layer=2, n_head=2,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4321)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_tiny_llama(folder: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = _tokenizer(bos=True)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(4321)
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def make_sums_jsonl(path: Path, rows: int = 120, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            a, b = (int(v) for v in rng.integers(10, size=2))
            handle.write(json.dumps({"prompt": f"add {a} and {b}:", "response": str(a + b)}) + "\n")
    return path


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("causal")
    return {
        "gpt2": make_tiny_gpt2(root / "tiny-gpt2"),
        "llama": make_tiny_llama(root / "tiny-llama"),
        "data": make_sums_jsonl(root / "sums.jsonl"),
    }


TARGETS = {"gpt2": "[c_attn, c_proj]", "llama": "[q_proj, v_proj]"}


def _cfg(assets, arch: str, out: Path, extra=()):
    return load_config(None, [
        f"model.name={assets[arch]}",
        "model.task_type=causal_lm",
        "model.max_length=16",
        f"data.task={assets['data']}",
        "data.text_column=prompt",
        "data.text_pair_column=response",
        "partition.scheme=iid",
        "partition.num_clients=3",
        "federation.method=fedex",
        "federation.rounds=2",
        "federation.clients_per_round=2",
        "train.local_steps=3",
        "train.batch_size=8",
        "train.lr=0.01",
        "lora.rank=4",
        "lora.alpha=8",
        f"lora.target_modules={TARGETS[arch]}",
        f"output_dir={out}",
        *extra,
    ])


def _run(cfg):
    from fedlora.sim.engine import Simulation

    sim = Simulation(cfg)
    return sim, sim.run()


@pytest.fixture(scope="module")
def gpt2_run(assets, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2-run") / "run"
    sim, records = _run(_cfg(assets, "gpt2", out))
    return sim, records, out


def _dev_inputs(sim) -> dict[str, torch.Tensor]:
    batch = batch_at(sim.data.dev, np.arange(sim.data.dev_size))
    return {k: v for k, v in batch.items() if k != "labels"}


def _logits(model, inputs) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**inputs).logits


def _check_run(sim, records, model_dir: Path, layout: str) -> None:
    from transformers import AutoModelForCausalLM

    assert len(records) == 2
    for r in records:
        assert r["metric_name"] == "perplexity"
        assert math.isfinite(r["metric"]) and r["metric"] > 1.0
        assert r["metric"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-9)
        assert r["local_metric"] is not None and math.isfinite(r["local_metric"])
        assert r["agg_error"] < 1e-5, r["agg_error"]
    assert adapters.head_parameters(sim.model) == {} and sim.global_head == {}
    assert {adapters.layout_of(layer) for layer in sim.layers.values()} == {layout}

    # Dense reference: W0 + sum of the folded corrections + s B A, each in the layer's storage orientation.
    ref = AutoModelForCausalLM.from_pretrained(model_dir)
    changed = 0.0
    with torch.no_grad():
        for m, layer in sim.layers.items():
            weight = ref.get_submodule(m).weight
            folded = sum((c[m].left.double() @ c[m].right.double() for c in sim.corrections if m in c),
                         torch.zeros(layer.out_features, layer.in_features, dtype=torch.float64))
            f = sim.global_state[m].factors
            adapter = f.scale * (f.B.double() @ f.A.double())
            to_storage = (lambda t: t.T) if layout == "conv1d" else (lambda t: t)
            expected_base = weight.double() + to_storage(folded)
            got_base = layer.get_base_layer().weight.double()
            assert got_base.shape == weight.shape
            assert torch.allclose(got_base, expected_base, atol=1e-6, rtol=0), (got_base - expected_base).abs().max()
            changed = max(changed, float((got_base - weight.double()).abs().max()))
            weight.copy_((expected_base + to_storage(adapter)).to(weight.dtype))
    assert changed > 1e-6, "FedEx should have folded a correction into the base weights"
    inputs = _dev_inputs(sim)
    got, want = _logits(sim.model, inputs), _logits(ref, inputs)
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(got[mask], want[mask], atol=1e-5, rtol=0), (got[mask] - want[mask]).abs().max()
    # perplexity = exp(mean loss per response token) = exp(Hugging Face's loss over the whole dev split)
    with torch.no_grad():
        hf_loss = float(sim.model(**batch_at(sim.data.dev, np.arange(sim.data.dev_size))).loss)
    assert records[-1]["eval_loss"] == pytest.approx(hf_loss, abs=1e-5)


def test_gpt2_fedex_run_folds_conv1d_corrections(assets, gpt2_run):
    sim, records, _ = gpt2_run
    _check_run(sim, records, assets["gpt2"], "conv1d")


def test_llama_fedex_run(assets, tmp_path):
    sim, records = _run(_cfg(assets, "llama", tmp_path / "run"))
    _check_run(sim, records, assets["llama"], "linear")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_labels_mask_prompt_and_padding(assets, tmp_path, arch):
    from transformers import AutoTokenizer

    from fedlora.sim.data import build_federated_data

    data = tmp_path / "two.jsonl"
    data.write_text(json.dumps({"prompt": "add 2 and 3:", "response": "5"}) + "\n"
                    + json.dumps({"prompt": "add 12 and 3 and 1:", "response": "16"}) + "\n")
    cfg = _cfg(assets, arch, tmp_path / "run",
               [f"data.task={data}", f"data.dev={data}", "partition.num_clients=1",
                "federation.clients_per_round=1", "partition.local_test_fraction=0",
                "data.prompt_template=none"])  # the prompts verbatim: the token ids below are written by hand
    fed = build_federated_data(cfg, tmp_path / "run")
    assert fed.metric == "perplexity" and fed.histograms["0"].tolist() == [2]
    assert json.loads((tmp_path / "run" / "label_histograms.json").read_text())["counts"] == [[2]]
    tokenizer = AutoTokenizer.from_pretrained(assets[arch])
    if tokenizer.pad_token is None:  # as adapters.load_base_model does
        tokenizer.pad_token = tokenizer.eos_token
    fed.encode(tokenizer, max_length=16)
    ids = tokenizer.convert_tokens_to_ids
    eos = tokenizer.eos_token_id
    bos = [tokenizer.bos_token_id] if arch == "llama" else []
    short = bos + ids(["add", "2", "and", "3", ":"])
    long_ = bos + ids(["add", "12", "and", "3", "and", "1", ":"])
    pad = tokenizer.pad_token_id
    width = len(long_) + 2
    enc = fed.dev
    assert enc["input_ids"].tolist() == [
        short + ids(["5"]) + [eos] + [pad] * (width - len(short) - 2),
        long_ + ids(["16"]) + [eos],
    ]
    assert enc["labels"].tolist() == [
        [-100] * len(short) + ids(["5"]) + [eos] + [-100] * (width - len(short) - 2),
        [-100] * len(long_) + ids(["16"]) + [eos],
    ]
    assert enc["attention_mask"].tolist() == [[1] * (len(short) + 2) + [0] * (width - len(short) - 2),
                                              [1] * width]
    # batch_at trims every (N, T) tensor alike, labels included, to the longest real sequence
    one = batch_at(enc, np.array([0]))
    assert {k: v.shape[1] for k, v in one.items()} == dict.fromkeys(one, len(short) + 2)
    assert one["labels"][0, -2:].tolist() == ids(["5"]) + [eos]


def test_label_aware_partition_is_refused(assets, tmp_path):
    from fedlora.sim.data import build_federated_data

    with pytest.raises(ValueError, match="partition.scheme"):
        build_federated_data(_cfg(assets, "gpt2", tmp_path / "run", ["partition.scheme=dirichlet"]),
                             tmp_path / "run")


def test_gpt2_export_loads_in_stock_peft_with_same_logits(assets, gpt2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.export import export_run

    sim, _, run_dir = gpt2_run
    inputs = _dev_inputs(sim)
    expected = _logits(sim.model, inputs)
    out = export_run(run_dir, tmp_path / "adapter").path
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fan_in_fan_out"] is True
    assert config["rank_pattern"] and min(config["rank_pattern"].values()) > 4
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["gpt2"]), out)
    got = _logits(loaded, inputs)
    mask = inputs["attention_mask"].bool()
    assert torch.allclose(got[mask], expected[mask], atol=1e-5, rtol=0), (got - expected)[mask].abs().max()

    merged = export_run(run_dir, tmp_path / "merged", merged=True).path
    got = _logits(AutoModelForCausalLM.from_pretrained(merged), inputs)
    assert torch.allclose(got[mask], expected[mask], atol=1e-5, rtol=0), (got - expected)[mask].abs().max()


def test_generation_metrics_by_hand():
    from fedlora.sim.generation import generation_metrics

    # "a c" against "a b c": LCS 2, precision 2/2, recall 2/3, F = 0.8; the other pair matches exactly
    got = generation_metrics(["a c", " x  y "], ["a b c", "x y"])
    assert got["exact_match"] == 0.5
    assert got["rouge_l"] == pytest.approx((0.8 + 1.0) / 2)


def test_records_carry_exact_match_rouge_and_samples(gpt2_run):
    sim, records, run_dir = gpt2_run
    for r in records:
        assert set(r["metrics"]) == {"perplexity", "exact_match", "rouge_l"}
        assert 0.0 <= r["metrics"]["exact_match"] <= 1.0 and 0.0 <= r["metrics"]["rouge_l"] <= 1.0
    rows = [json.loads(line) for line in (run_dir / "generations" / "round_0002.jsonl").read_text().splitlines()]
    assert len(rows) == min(5, sim.data.dev_size)
    assert rows[0]["prompt"].startswith("### Instruction:\n") and rows[0]["reference"] == sim.data.dev_set.text_pairs[0]


def test_the_exported_adapter_generates_the_same_tokens_in_stock_peft(assets, gpt2_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from fedlora.export import export_run

    sim, _, run_dir = gpt2_run
    tokenizer = sim.tokenizer
    tokenizer.padding_side = "left"
    batch = tokenizer(sim.data.dev_prompts[:8], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"

    def tokens(model):  # 12 greedy tokens, never stopped early, so every position is compared
        model.eval()
        with torch.no_grad():
            return model.generate(**batch, max_new_tokens=12, min_new_tokens=12, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=None)

    want = tokens(sim.model)
    out = export_run(run_dir, tmp_path / "adapter").path
    got = tokens(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["gpt2"]), out))
    assert want.shape[1] == batch["input_ids"].shape[1] + 12
    assert torch.equal(got, want)


def test_gradient_checkpointing_recomputes_to_the_same_run_and_bf16_stays_close(assets, tmp_path):
    plain = _run(_cfg(assets, "llama", tmp_path / "plain"))[1]
    sim, ckpt = _run(_cfg(assets, "llama", tmp_path / "ckpt", ["train.gradient_checkpointing=true"]))
    assert sim.model.get_base_model().is_activation_checkpointing
    for a, b in zip(plain, ckpt):  # recomputation repeats the same float32 forward: the same numbers
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-5)
        assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-5)
    half = _run(_cfg(assets, "llama", tmp_path / "bf16", ["train.bf16=true"]))[1]
    assert half[0]["train_loss"] != plain[0]["train_loss"]  # the forward really ran in bfloat16
    assert half[-1]["eval_loss"] == pytest.approx(plain[-1]["eval_loss"], rel=0.05)
