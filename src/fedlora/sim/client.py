"""Local training of one client on the shared model: batches, AdamW with warm-up, optional proximal term."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # label value of prompt and padding tokens (fedlora.data.IGNORE_INDEX)


def batch_at(encoded: dict[str, Tensor], idx: np.ndarray) -> dict[str, Tensor]:
    """Rows ``idx`` of the encoded split, trimmed to the longest real sequence (padding is on the right)."""
    batch = {k: v[torch.as_tensor(idx)] for k, v in encoded.items()}
    mask = batch.get("attention_mask")
    if mask is None:
        return batch
    longest = int(mask.sum(1).max())
    return {k: v[:, :longest] if v.ndim == 2 else v for k, v in batch.items()}


def local_batches(indices: np.ndarray, batch_size: int, steps: int, seed: list[int]) -> Iterator[np.ndarray]:
    """``steps`` batches from passes over the shuffled local data (reshuffled every pass), seeded."""
    rng = np.random.default_rng(seed)
    queue = np.empty(0, dtype=np.int64)
    for _ in range(steps):
        while len(queue) < min(batch_size, len(indices)):
            queue = np.concatenate([queue, rng.permutation(indices)])
        yield queue[:batch_size]
        queue = queue[batch_size:]


def train_local(
    model: nn.Module,
    params: list[nn.Parameter],
    batches: Iterator[np.ndarray],
    encoded: dict[str, Tensor],
    *,
    steps: int,
    lr: float,
    weight_decay: float,
    warmup_steps: int,
    max_grad_norm: float | None,
    optimizer_state: dict | None = None,
    penalty: Callable[[], Tensor] | None = None,
) -> tuple[float, dict]:
    """Run ``steps`` AdamW steps; returns the mean training loss and the optimizer's state dict."""
    model.train()
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if optimizer_state is not None and len(optimizer_state["state"]) == len(params):
        # Kept state only fits the same parameters (a method that freezes A later starts afresh).
        optimizer.load_state_dict(optimizer_state)
        for group in optimizer.param_groups:  # the loaded state carries the old lr
            group["lr"] = lr
    warm = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    total, count = 0.0, 0
    for idx in batches:
        batch = batch_at(encoded, idx)
        loss = model(**batch).loss
        if penalty is not None:
            loss = loss + penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        optimizer.step()
        scheduler.step()
        value = float(loss.detach())
        total += value if math.isfinite(value) else float("nan")
        count += 1
    return total / max(count, 1), optimizer.state_dict()


def is_token_level(encoded: dict[str, Tensor]) -> bool:
    """Labels per token (causal LM, ``(N, T)``) rather than per example (classification, ``(N,)``)."""
    labels = encoded.get("labels")
    return labels is not None and labels.ndim == 2


@torch.no_grad()
def predict(model: nn.Module, encoded: dict[str, Tensor], indices: np.ndarray, batch_size: int) -> tuple[Tensor, float]:
    """Logits (concatenated) and mean loss over ``indices``.

    With per-token labels (a causal LM) the logits would be ``(N, T, vocab)``: instead this returns
    :func:`token_losses`' ``(N, 2)`` rows (summed loss, target tokens) and the mean loss per target token.
    """
    if is_token_level(encoded):
        stats = token_losses(model, encoded, indices, batch_size)
        return stats, mean_token_loss(stats)
    model.eval()
    logits, loss_sum, n = [], 0.0, 0
    for start in range(0, len(indices), batch_size):
        idx = indices[start : start + batch_size]
        out = model(**batch_at(encoded, idx))
        logits.append(out.logits.float())
        loss_sum += float(out.loss) * len(idx)
        n += len(idx)
    return (torch.cat(logits) if logits else torch.empty(0)), loss_sum / max(n, 1)


@torch.no_grad()
def token_losses(model: nn.Module, encoded: dict[str, Tensor], indices: np.ndarray,
                 batch_size: int) -> Tensor:
    """Per example of ``indices``: the summed next-token loss over its target tokens, and their count.

    Targets are the labels not equal to -100 (the response, for instruction data), shifted by one as in
    Hugging Face's causal-LM loss. Logits live one batch at a time. Returns ``float64`` ``(N, 2)``.
    """
    model.eval()
    rows = []
    for start in range(0, len(indices), batch_size):
        batch = batch_at(encoded, indices[start : start + batch_size])
        labels = batch.pop("labels")[:, 1:]
        logits = model(**batch).logits[:, :-1].float()
        nll = nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE_INDEX,
                                          reduction="none")
        counts = (labels != IGNORE_INDEX).sum(1)
        rows.append(torch.stack([nll.double().sum(1), counts.double()], 1).cpu())
    return torch.cat(rows) if rows else torch.zeros(0, 2, dtype=torch.float64)


def mean_token_loss(stats: Tensor) -> float:
    """Token-weighted mean loss of :func:`token_losses` rows (NaN when there is no target token)."""
    total, tokens = (float(v) for v in stats.sum(0)) if len(stats) else (0.0, 0.0)
    return total / tokens if tokens > 0 else float("nan")
