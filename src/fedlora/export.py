"""Export a run as a stock PEFT adapter folder (or a merged model), exact or compacted to a given rank.

Methods that change the frozen weights (FedEx-LoRA, FRA with fold, FLoRA, HEXA) leave a cumulative
correction ``C`` next to the adapter ``s B A``. Both are low rank, so the exact model is itself a LoRA of
rank ``r + rank(C)``: ``B' = [s B, C_left]``, ``A' = [A; C_right]`` with ``lora_alpha = r'`` (scale 1), set
per module through PEFT's ``rank_pattern`` and ``alpha_pattern``. ``PeftModel.from_pretrained`` on the
untouched base model then reproduces the run's model. ``merged=True`` instead writes a full model with
everything folded in.

That rank grows every round. ``rank=R`` writes a compact adapter instead: per module the whole update
``U = s B A + C`` is replaced by its best rank-``R`` approximation ``U_R`` (Eckart-Young), computed from the
factors (thin QRs and the SVD of a small core, :func:`fedlora.lowrank.truncate`; never ``d_out x d_in``),
written as a balanced split ``B = U_R S_R^1/2``, ``A = S_R^1/2 V_R^T`` at scale 1. The error it leaves is
``||U - U_R||_F / ||U||_F`` = root-sum-square of the dropped singular values over that of all of them,
per module and overall (root-sum-square over modules over the total norm); it is returned and saved as
``rank_error.json`` next to the adapter. A module whose update has rank ``<= R`` is kept exact at its own
rank (no zero padding). Heads are exported unchanged either way.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import adapters, checkpoint, lowrank
from .config import config_from_dict
from .protocol import CorrectionHistory
from .types import LoRAFactors, LowRank

RANK_ERROR_FILE = "rank_error.json"


@dataclass
class ExportResult:
    """What :func:`export_run` wrote.

    ``path`` is the adapter (or merged model) folder, ``round`` the checkpoint round exported. With a
    target ``rank``, ``rank_error`` is the overall relative Frobenius error ``||U - U_R|| / ||U||`` over all
    adapted modules and ``module_errors`` the same per module (0 for modules kept exact); both are None /
    empty for an exact export. ``skipped`` lists one-line notes about newer damaged rounds passed over.
    """

    path: Path
    round: int
    rank: int | None = None
    rank_error: float | None = None
    module_errors: dict[str, float] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)


def cumulative_corrections(run_dir: Path, last_round: int) -> dict[str, LowRank]:
    """Sum of the per-round corrections of rounds ``1..last_round``, kept as factors: what a client that
    never took part would catch up on (:meth:`~fedlora.protocol.CorrectionHistory.since` version 0)."""
    history = CorrectionHistory(load=lambda r: checkpoint.load_round_corrections(run_dir, r), latest=last_round)
    return history.since(0)


def _check_rank(rank: int | None) -> None:
    if rank is None:
        return
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"--rank must be a positive integer, got {rank!r}")


def _truncated(update: LowRank, rank: int) -> tuple[LoRAFactors, float, float]:
    """Best rank-``rank`` adapter (scale 1) of ``update``, ``||U - U_R||_F`` and ``||U||_F``.

    The SVD runs in float64 on the factors (cost ``O((d_out + d_in) k^2)``); the factors come back in
    ``update``'s dtype. Called only with ``rank`` below ``update``'s inner dimension.
    """
    dtype = update.left.dtype
    u64 = LowRank(update.left.double(), update.right.double())
    m, n = update.shape
    head, _, dropped = lowrank.truncate(u64, min(rank, m, n), split="balanced")
    tail = math.sqrt(float(dropped.square().sum()))
    kept = lowrank.frobenius_norm(head)
    return LoRAFactors(head.left.to(dtype), head.right.to(dtype), 1.0), tail, math.hypot(kept, tail)


def export_run(
    run_dir: str | Path, out_dir: str | Path, *, merged: bool = False, rank: int | None = None
) -> ExportResult:
    """Write the newest intact checkpoint of ``run_dir`` to ``out_dir`` as a PEFT adapter (or merged model).

    Parameters
    ----------
    run_dir : str | Path
        A run folder with ``checkpoints/``.
    out_dir : str | Path
        Output folder; replaced if it exists.
    merged : bool (default: False)
        Write a full model with the (possibly truncated) update folded in, instead of an adapter.
    rank : int | None (default: None)
        None: the exact adapter of rank ``r + rank(C)`` per module. ``R``: the best rank-``R``
        approximation of each module's whole update, and its relative error (also in ``rank_error.json``).

    Raises
    ------
    ValueError
        A bad ``rank`` (one line naming ``--rank``), or no usable checkpoint.
    """
    _check_rank(rank)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    intact = checkpoint.newest_intact_round(run_dir)  # CheckpointError (a ValueError) when none is usable
    last, folder = intact.number, intact.folder
    state = checkpoint.load_state(folder)
    cfg = config_from_dict(state["config"])
    corrections = {m: c for m, c in cumulative_corrections(run_dir, last).items() if c.rank > 0}

    adapters.check_model(cfg.model)  # the run's model may have moved since: one line, before any loading
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
    module_errors: dict[str, float] = {}
    rank_error = None
    if rank is None:
        if corrections:
            config.rank_pattern = {m: factors[m].rank for m in corrections}
            config.alpha_pattern = {m: float(factors[m].rank) for m in corrections}
    else:
        tail_sq = total_sq = 0.0
        for m, f in factors.items():
            if rank >= f.rank:  # already of rank <= R: exact, kept at its own rank
                factors[m] = LoRAFactors(f.scale * f.B, f.A, 1.0)
                module_errors[m] = 0.0
                total_sq += lowrank.frobenius_norm(factors[m].as_lowrank()) ** 2
                continue
            factors[m], tail, total = _truncated(f.as_lowrank(), rank)
            module_errors[m] = tail / total if total > 0 else 0.0
            tail_sq, total_sq = tail_sq + tail**2, total_sq + total**2
        rank_error = math.sqrt(tail_sq / total_sq) if total_sq > 0 else 0.0
        config.r, config.lora_alpha = rank, float(rank)
        config.rank_pattern = {m: f.rank for m, f in factors.items() if f.rank != rank}
        config.alpha_pattern = {m: float(f.rank) for m, f in factors.items() if f.rank != rank}
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
    if rank is not None:
        report = {"rank": rank, "relative_error": rank_error, "modules": module_errors, "round": last}
        (out_dir / RANK_ERROR_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return ExportResult(out_dir, last, rank, rank_error, module_errors, list(intact.skipped))
