"""Local training of one client on the host model: batches, AdamW with warm-up, optional proximal term,
and :func:`train_client`, which runs one :class:`~fedlora.protocol.ClientTask` into a reply."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from .. import adapters, lowrank, seeds

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
    bf16: bool = False,
) -> tuple[float, dict]:
    """Run ``steps`` AdamW steps; returns the mean training loss and the optimizer's state dict.

    ``bf16``: forward passes under CPU bfloat16 autocast (the weights, gradients and optimizer stay float32).
    """
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
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss.float()
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


# ---------------------------------------------------------------- one client's round, on the host

@dataclass
class ClientData:
    """One client's own side: its encoded training split, its example indices, its label histogram and,
    with ``optimizer_state="kept"``, its AdamW state between rounds."""

    encoded: dict[str, Tensor]
    indices: np.ndarray
    label_histogram: np.ndarray | None = None
    optimizer_state: dict | None = None


def local_steps(settings, num_examples: int) -> int:
    """``local_steps``, or enough steps for ``local_epochs`` passes over the client's data."""
    if settings.local_steps:
        return settings.local_steps
    return max(1, int(np.ceil(settings.local_epochs * num_examples / settings.batch_size)))


def train_client(host, task, data: ClientData):
    """Train one client's task on the host and return its :class:`~fedlora.protocol.ClientReply`.

    The only code that trains a client, whatever the runtime. The task's adapter and head are loaded into
    the host's adapter of the task's rank; its frozen terms join the frozen weights for this task only;
    modules outside ``task.modules`` neither train nor run a backward pass, and are not sent back.
    """
    from ..protocol import ClientReply

    settings = task.train
    adapter = host.adapter_for(task.rank)
    host.install(task.adapter, task.head, adapter)
    modules = set(task.modules) if task.modules is not None else None
    with host.frozen_terms(task.frozen):
        heads = host.heads(adapter)
        params = adapters.adapter_parameters(host.layers, task.train_a, task.train_b, adapter, modules)
        params += list(heads.values())
        steps = local_steps(settings, len(data.indices))
        torch.manual_seed(seeds.integer(task.seed, "dropout"))
        kept = data.optimizer_state if settings.optimizer_state == "kept" else None
        dp = task.privacy.get("noise_multiplier") is not None
        if dp:  # sample-level DP-SGD: Poisson samples at the rate the server's accountant assumed
            from .dp import poisson_batches, train_local_dp

            rate = float(task.privacy["sample_rate"])
            loss, opt_state = train_local_dp(
                host.model, params, poisson_batches(data.indices, rate, steps, seeds.sequence(task.seed, "dp_batches")),
                data.encoded, lr=settings.lr, weight_decay=settings.weight_decay, warmup_steps=settings.warmup_steps,
                noise_multiplier=float(task.privacy["noise_multiplier"]), clip=float(task.privacy["clip"]),
                expected_batch_size=rate * len(data.indices), seed=task.seed, batch_at=batch_at,
            )
        else:
            batches = local_batches(data.indices, settings.batch_size, steps, seeds.sequence(task.seed, "batches"))
            loss, opt_state = train_local(
                host.model, params, batches, data.encoded,
                steps=steps, lr=settings.lr, weight_decay=settings.weight_decay,
                warmup_steps=settings.warmup_steps, max_grad_norm=settings.max_grad_norm,
                optimizer_state=kept, penalty=_penalty(host, task, adapter, modules), bf16=settings.bf16,
            )
    if settings.optimizer_state == "kept":
        data.optimizer_state = opt_state
    metrics = {}
    if settings.prune_threshold > 0:
        metrics["rank"] = float(_prune(host, adapter, modules, settings))
    trained = host.read_state(adapter)
    reply = ClientReply(
        round=task.round,
        client_id=task.client_id,
        rank=task.rank,
        factors={m: s.factors for m, s in trained.items() if modules is None or m in modules},
        num_examples=len(data.indices),
        train_loss=loss,
        head={k: p.detach().clone() for k, p in heads.items()},
        label_histogram=(torch.as_tensor(data.label_histogram, dtype=torch.float64)
                         if data.label_histogram is not None else None),
        sent_a=task.train_a,
        metrics=metrics,
    )
    adapters.activate(host.model, adapters.ADAPTER)
    return reply


def _penalty(host, task, adapter: str, modules) -> Callable[[], Tensor] | None:
    """The method's local penalties over the modules that train: FedProx-style proximal term and HetLoRA's
    tail-rank norms; None when there is neither."""
    terms = [t for t in (_proximal(host, task, adapter, modules), _tail_norms(host, task, adapter, modules)) if t]
    if not terms:
        return None
    return terms[0] if len(terms) == 1 else (lambda: sum(t() for t in terms))


def _trained_layers(host, adapter: str, modules):
    return [(m, layer) for m, layer in host.layers.items() if (modules is None or m in modules)]


def _tail_norms(host, task, adapter: str, modules) -> Callable[[], Tensor] | None:
    """``lambda * sum_m sum_{last delta ranks} ||b_i|| ||a_i||`` (HetLoRA's self-pruning penalty)."""
    lam, tail = float(task.train.rank_penalty), int(task.train.penalty_ranks)
    if lam <= 0 or tail <= 0:
        return None
    layers = [layer for _, layer in _trained_layers(host, adapter, modules)]

    def penalty() -> Tensor:
        return lam * sum(lowrank.tail_penalty(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight, tail)
                         for layer in layers)

    return penalty


@torch.no_grad()
def _prune(host, adapter: str, modules, settings) -> int:
    """Zero the trailing ranks below the share threshold in every trained module; the rank kept."""
    layers = [layer for _, layer in _trained_layers(host, adapter, modules)]
    pairs = [(layer.lora_B[adapter].weight, layer.lora_A[adapter].weight) for layer in layers]
    kept = lowrank.pruned_rank(pairs, settings.prune_threshold, settings.min_rank)
    for B, A in pairs:
        B[:, kept:] = 0
        A[kept:] = 0
    return kept


def _proximal(host, task, adapter: str, modules) -> Callable[[], Tensor] | None:
    """``mu/2 sum_m s^2 ||B A - B0 A0||_F^2`` over the modules that train, in factored form."""
    mu = float(task.proximal_mu)
    if mu <= 0:
        return None
    pairs = [(host.layers[m], f) for m, f in task.adapter.items() if modules is None or m in modules]

    def penalty() -> Tensor:
        total = 0.0
        for layer, f in pairs:
            B = layer.lora_B[adapter].weight
            A = layer.lora_A[adapter].weight
            total = total + f.scale**2 * lowrank.proximal_penalty(B, A, f.B, f.A)
        return 0.5 * mu * total

    return penalty
