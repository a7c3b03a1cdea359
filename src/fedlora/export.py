"""Export a run as a stock PEFT adapter folder (or a merged model).

Methods that change the frozen weights (FedEx-LoRA, FRA with fold, FLoRA, HEXA) leave a cumulative
correction ``C`` next to the adapter ``s B A``. Both are low rank, so the exact model is itself a LoRA of
rank ``r + rank(C)``: ``B' = [s B, C_left]``, ``A' = [A; C_right]`` with ``lora_alpha = r'`` (scale 1), set
per module through PEFT's ``rank_pattern`` and ``alpha_pattern``. ``PeftModel.from_pretrained`` on the
untouched base model then reproduces the run's model. ``merged=True`` instead writes a full model with
everything folded in.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from . import adapters, checkpoint, lowrank
from .config import config_from_dict
from .types import LoRAFactors, LowRank


def cumulative_corrections(run_dir: Path, last_round: int) -> dict[str, LowRank]:
    """Sum of the per-round corrections of rounds ``1..last_round``, kept as factors (re-compressed)."""
    terms: dict[str, list[LowRank]] = {}
    for r in range(1, last_round + 1):
        for m, c in checkpoint.load_corrections(checkpoint.round_dir(run_dir, r)).items():
            terms.setdefault(m, []).append(c)
    return {m: lowrank.compact(lowrank.concat(ts)) for m, ts in terms.items()}


def export_run(run_dir: str | Path, out_dir: str | Path, *, merged: bool = False) -> Path:
    """Write the newest checkpoint of ``run_dir`` to ``out_dir`` as a PEFT adapter (or merged model)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    found = checkpoint.latest_round(run_dir)
    if found is None:
        raise ValueError(f"{run_dir}: no checkpoint to export")
    last, folder = found
    state = checkpoint.load_state(folder)
    cfg = config_from_dict(state["config"])
    corrections = {m: c for m, c in cumulative_corrections(run_dir, last).items() if c.rank > 0}

    base, tokenizer = adapters.load_base_model(cfg.model, state["num_labels"], cfg.seed)
    probe = adapters.attach_lora(base, cfg.lora, cfg.model.task_type)
    layers = adapters.lora_layers(probe)
    scales = {m: float(layer.scaling[adapters.ADAPTER]) for m, layer in layers.items()}
    trained, heads = checkpoint.load_adapter(folder, scales, adapters.head_parameters(probe))
    base = probe.unload()  # back to the untouched base model

    factors = {}
    for m, f in trained.items():
        c = corrections.get(m)
        if c is None:
            factors[m] = f
        else:  # exact adapter of rank r + rank(C), scale 1
            factors[m] = LoRAFactors(torch.cat([f.scale * f.B, c.left], 1), torch.cat([f.A, c.right], 0), 1.0)

    config = adapters.lora_config(cfg.lora, base, cfg.model.task_type)
    if corrections:
        config.rank_pattern = {m: factors[m].rank for m in corrections}
        config.alpha_pattern = {m: float(factors[m].rank) for m in corrections}
    from peft import get_peft_model

    model = get_peft_model(base, config)
    export_layers = adapters.lora_layers(model)
    adapters.write_factors(export_layers, factors)
    with torch.no_grad():
        for k, p in adapters.head_parameters(model).items():
            p.copy_(heads[k])
    if out_dir.exists():
        shutil.rmtree(out_dir)
    if merged:
        model.merge_and_unload().save_pretrained(out_dir)
    else:
        model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
