"""``export_run`` with and without ``rank``: stock PEFT reloads, and the rank-R error against a dense
float64 SVD computed here (Eckart-Young), on a 2-round HEXA run of the tiny random BERT."""

from __future__ import annotations

import json

import pytest
import torch

from engine_fixtures import make_sentiment_tsv, make_tiny_bert, tiny_overrides
from fedlora.config import load_config

SENTENCES = ["movie was good and great", "plot was awful and dull", "the ending was warm", "sad cold film"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One short HEXA run (folds corrections every round) and its exports, shared by every test."""
    from fedlora.export import export_run
    from fedlora.sim.engine import Simulation

    root = tmp_path_factory.mktemp("export")
    model_dir = make_tiny_bert(root / "tiny-bert")
    data = make_sentiment_tsv(root / "train.tsv")
    cfg = load_config(None, tiny_overrides(model_dir, data, root / "run", "hexa", rounds=2))
    Simulation(cfg).run()
    exports = {
        "full": export_run(root / "run", root / "full"),
        1: export_run(root / "run", root / "r1", rank=1),
        2: export_run(root / "run", root / "r2", rank=2),
        1000: export_run(root / "run", root / "r1000", rank=1000),
        "2merged": export_run(root / "run", root / "r2merged", rank=2, merged=True),
    }
    return {"root": root, "model_dir": model_dir, "exports": exports}


def _base(model_dir):
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2).eval()


def _peft(model_dir, folder):
    from peft import PeftModel

    return PeftModel.from_pretrained(_base(model_dir), folder).eval()


def _logits(model, model_dir):
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(model_dir)(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def _updates(model) -> dict[str, torch.Tensor]:
    """Each LoRA module's dense update ``scaling * B @ A`` in float64, read through PEFT itself."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer):
            B, A = layer.lora_B["default"].weight.double(), layer.lora_A["default"].weight.double()
            out[name.removeprefix("base_model.model.")] = layer.scaling["default"] * (B @ A)
    return out


def _svd_reference(full: dict[str, torch.Tensor], rank: int):
    """Per module: the best rank-``rank`` matrix, ``||U - U_R||`` and ``||U||`` from a dense float64 SVD."""
    ref = {}
    for m, U in full.items():
        u, s, vh = torch.linalg.svd(U, full_matrices=False)
        ref[m] = ((u[:, :rank] * s[:rank]) @ vh[:rank], float(s[rank:].norm()), float(s.norm()))
    return ref


def test_result_fields_and_exact_export_unchanged(run):
    full = run["exports"]["full"]
    assert full.path == run["root"] / "full" and full.round == 2 and full.skipped == []
    assert full.rank is None and full.rank_error is None and full.module_errors == {}
    assert not (full.path / "rank_error.json").exists()
    config = json.loads((full.path / "adapter_config.json").read_text())
    # HEXA folded corrections: the exact adapter is of rank above the run's 4
    assert config["rank_pattern"] and min(config["rank_pattern"].values()) > 4


def test_rank_covering_everything_is_exact(run):
    model_dir, ex = run["model_dir"], run["exports"]
    got = _logits(_peft(model_dir, ex[1000].path), model_dir)
    expected = _logits(_peft(model_dir, ex["full"].path), model_dir)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    assert ex[1000].rank_error < 1e-6 and max(ex[1000].module_errors.values()) < 1e-6
    # no padding: each module keeps its own (exact) rank
    full_ranks = json.loads((ex["full"].path / "adapter_config.json").read_text())["rank_pattern"]
    config = json.loads((ex[1000].path / "adapter_config.json").read_text())
    for m, r in config["rank_pattern"].items():
        assert r == full_ranks.get(m, 4) and config["alpha_pattern"][m] == r


@pytest.mark.parametrize("rank", [1, 2])
def test_rank_r_error_matches_dense_eckart_young(run, rank):
    model_dir, ex = run["model_dir"], run["exports"]
    full = _updates(_peft(model_dir, ex["full"].path))
    compact = _peft(model_dir, ex[rank].path)
    got = _updates(compact)
    ref = _svd_reference(full, rank)
    assert set(got) == set(full) == set(ex[rank].module_errors)
    tail_sq = total_sq = 0.0
    for m, (best, tail, total) in ref.items():
        err = ex[rank].module_errors[m]
        assert err == pytest.approx(tail / total, rel=1e-4, abs=1e-6), m
        # the written adapter is rank R at scale 1 and is the dense SVD's truncation itself
        assert compact.peft_config["default"].rank_pattern.get(m, compact.peft_config["default"].r) == rank
        layer = compact.get_submodule(f"base_model.model.{m}")
        assert layer.lora_A["default"].weight.shape[0] == rank and layer.scaling["default"] == 1.0
        assert float((got[m] - best).norm()) <= 1e-4 * total, m
        # what the adapter leaves out of the full update is the reported error
        assert float((full[m] - got[m]).norm()) / total == pytest.approx(err, rel=1e-4, abs=1e-6), m
        tail_sq, total_sq = tail_sq + tail**2, total_sq + total**2
    assert ex[rank].rank_error == pytest.approx((tail_sq / total_sq) ** 0.5, rel=1e-4)
    assert ex[rank].rank_error > 1e-3  # R is below the update's rank: something is dropped
    # dropping part of the update moves the logits
    delta = (_logits(compact, model_dir) - _logits(_peft(model_dir, ex["full"].path), model_dir)).abs().max()
    assert delta > 1e-6


def test_errors_shrink_as_rank_grows(run):
    ex = run["exports"]
    assert ex[1].rank_error >= ex[2].rank_error >= ex[1000].rank_error == 0.0
    for m in ex[1].module_errors:
        assert ex[1].module_errors[m] >= ex[2].module_errors[m] - 1e-7


def test_merged_rank_r_folds_the_truncated_update(run):
    from transformers import AutoModelForSequenceClassification

    model_dir, ex = run["model_dir"], run["exports"]
    merged = AutoModelForSequenceClassification.from_pretrained(ex["2merged"].path).eval()
    compact = _peft(model_dir, ex[2].path)
    got, expected = _logits(merged, model_dir), _logits(compact, model_dir)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (got - expected).abs().max()
    full, base = _updates(_peft(model_dir, ex["full"].path)), _base(model_dir)
    for m, (best, tail, total) in _svd_reference(full, 2).items():
        folded = (merged.get_submodule(m).weight - base.get_submodule(m).weight).detach().double()
        assert float((folded - best).norm()) <= 1e-4 * total, m
        assert float((full[m] - folded).norm()) / total == pytest.approx(ex[2].module_errors[m], rel=1e-3), m
    assert ex["2merged"].rank_error == ex[2].rank_error


def test_rank_error_json(run):
    ex = run["exports"][2]
    report = json.loads((ex.path / "rank_error.json").read_text())
    assert report == {"rank": 2, "relative_error": ex.rank_error, "modules": ex.module_errors, "round": 2}


def test_damaged_newest_round_is_skipped_and_reported(run, tmp_path):
    import shutil

    from fedlora.export import export_run

    shutil.copytree(run["root"] / "run" / "checkpoints", tmp_path / "run" / "checkpoints")
    adapter = tmp_path / "run" / "checkpoints" / "round_0002" / "adapter.safetensors"
    adapter.write_bytes(adapter.read_bytes()[:-8])
    result = export_run(tmp_path / "run", tmp_path / "out", rank=2)
    assert result.round == 1 and json.loads((tmp_path / "out" / "rank_error.json").read_text())["round"] == 1
    assert len(result.skipped) == 1 and "round 2" in result.skipped[0] and "\n" not in result.skipped[0]
    with pytest.raises(ValueError, match="no checkpoint"):
        export_run(tmp_path / "empty", tmp_path / "out2", rank=2)


@pytest.mark.parametrize("rank", [0, -3, 2.5, True])
def test_bad_rank_is_one_line_naming_the_option(run, tmp_path, rank):
    from fedlora.export import export_run

    with pytest.raises(ValueError, match="--rank") as err:
        export_run(run["root"] / "run", tmp_path / "out", rank=rank)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
