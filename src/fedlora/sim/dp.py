"""Sample-level DP-SGD for one client's local steps, through Opacus.

Each step draws a Poisson sample of the client's examples (each one in with probability ``q``, the rate the
accountant assumes), computes per-example gradients of the trained LoRA factors and head
(:class:`opacus.GradSampleModule`), clips each to norm ``clip``, sums, adds Gaussian noise of standard
deviation ``noise_multiplier * clip`` and divides by the expected batch size ``q n``
(:class:`opacus.optimizers.DPOptimizer` around AdamW). Sampling and noise come from the task's named seed
streams, so a round replays exactly. An empty Poisson sample still takes its noisy step (a zero gradient
contributes nothing after clipping), as the accountant counts it.

The hooks are removed after the client's steps: the host model is shared with other clients.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor, nn

from .. import seeds
from ..protocol import TrainSettings


def poisson_batches(indices: np.ndarray, sample_rate: float, steps: int, seed: list[int]) -> Iterator[np.ndarray]:
    """``steps`` Poisson samples of ``indices`` at ``sample_rate`` (seeded)."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        yield indices[rng.random(len(indices)) < sample_rate]


def train_local_dp(model: nn.Module, params: list[nn.Parameter], batches: Iterator[np.ndarray],
                   encoded: dict[str, Tensor], *, lr: float, weight_decay: float, warmup_steps: int,
                   noise_multiplier: float, clip: float, expected_batch_size: float, seed: list[int],
                   batch_at) -> tuple[float, dict]:
    """DP-SGD steps over ``batches``; the mean loss over non-empty steps and the AdamW state."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    model.train()
    generator = torch.Generator().manual_seed(seeds.integer(seed, "dp_noise"))
    wrapped = GradSampleModule(model, strict=True)
    inner = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    optimizer = DPOptimizer(inner, noise_multiplier=noise_multiplier, max_grad_norm=clip,
                            expected_batch_size=max(1, round(expected_batch_size)), generator=generator)
    warm = max(warmup_steps, 0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(inner, lambda s: min(1.0, (s + 1) / warm) if warm else 1.0)
    total, count = 0.0, 0
    try:
        for idx in batches:
            optimizer.zero_grad(set_to_none=True)
            if len(idx):
                loss = wrapped(**batch_at(encoded, idx)).loss
                loss.backward()
                value = float(loss.detach())
                total += value if math.isfinite(value) else float("nan")
                count += 1
            else:  # nothing sampled: the noise alone, as accounted
                for p in params:
                    p.grad_sample = torch.zeros((1, *p.shape), dtype=p.dtype)
            optimizer.step()
            scheduler.step()
    finally:
        wrapped._close()  # removes every hook Opacus added; the model is the host's
        for p in params:
            for name in ("grad_sample", "summed_grad", "_forward_counter"):
                if hasattr(p, name):
                    delattr(p, name)
    return total / max(count, 1), inner.state_dict()


# ---------------------------------------------------------------------------- the server's side
class PrivacyLedger:
    """Each client's DP-SGD settings, derived once for the whole run, and the epsilon it has spent.

    ``sizes`` are the clients' training examples. The noise of client ``k`` is the smallest that keeps
    ``rounds * steps_k`` steps at rate ``q_k = batch_size / n_k`` within ``target_epsilon`` at ``delta``: as if
    it trained in every round, so sampling fewer rounds only spends less. Epsilon is reported per client at
    that same ``delta``, from the steps it was actually sent (a client whose reply is lost may still have
    trained).
    """

    def __init__(self, *, target_epsilon: float, delta: float | None, clip: float, accountant: str,
                 sizes: dict[str, int], steps: dict[str, int], batch_size: int, rounds: int):
        from ..privacy import check_delta, default_delta, noise_multiplier

        smallest = min(sizes.values())
        self.delta = check_delta(delta if delta is not None else default_delta(smallest), smallest)
        self.accountant = accountant
        self.settings = {}
        for cid, n in sizes.items():
            rate = min(1.0, batch_size / n)
            sigma = noise_multiplier(target_epsilon, self.delta, rate, rounds * steps[cid], accountant)
            self.settings[cid] = {"noise_multiplier": sigma, "clip": clip, "sample_rate": rate,
                                  "delta": self.delta, "accountant": accountant}
        self.steps_of = dict(steps)
        self.spent_steps: dict[str, int] = {}

    def charge(self, clients) -> dict[str, float]:
        """Count one round of steps for ``clients``; every client's epsilon so far (those that trained)."""
        from ..privacy import epsilon_spent

        for cid in clients:
            self.spent_steps[cid] = self.spent_steps.get(cid, 0) + self.steps_of[cid]
        return {cid: epsilon_spent([(self.settings[cid]["noise_multiplier"], self.settings[cid]["sample_rate"], n)],
                                   self.delta, self.accountant) for cid, n in sorted(self.spent_steps.items())}

    def state(self) -> dict:
        return {"spent_steps": dict(self.spent_steps)}

    def load_state(self, state: dict) -> None:
        self.spent_steps = {cid: int(n) for cid, n in state.get("spent_steps", {}).items()}


def privacy_ledger(cfg, aggregator, train: TrainSettings, sizes: dict[str, int]) -> PrivacyLedger | None:
    """The run's DP-SGD ledger (None without ``privacy.target_epsilon``); one-line errors for what DP-SGD
    cannot cover."""
    p = cfg.privacy
    if p.target_epsilon is None:
        return None
    from .client import local_steps

    settings = check_privacy(cfg, aggregator, train)
    steps = {cid: local_steps(settings, n) for cid, n in sizes.items()}
    return PrivacyLedger(target_epsilon=p.target_epsilon, delta=p.delta, clip=p.clip, accountant=p.accountant,
                         sizes=sizes, steps=steps, batch_size=cfg.train.batch_size, rounds=cfg.federation.rounds)


def client_dp(cfg, ranks: dict[str, int] | None = None):
    """The run's client-level DP mechanism (:class:`fedlora.privacy.ClientDP`), or None; one-line errors."""
    from ..privacy import ClientDP, check_delta, default_delta

    p, fed = cfg.privacy, cfg.federation
    if p.client_epsilon is None and p.client_noise_multiplier is None:
        return None
    key = "privacy.client_epsilon" if p.client_epsilon is not None else "privacy.client_noise_multiplier"
    if p.client_epsilon is not None and p.client_noise_multiplier is not None:
        raise ValueError("privacy: give client_epsilon or client_noise_multiplier, not both")
    options = fed.method_options
    if fed.method != "fra" or not options.get("fold_tail") or options.get("ffa_after") is not None:
        raise ValueError(f"{key}: client-level DP releases a noisy mean that only fra with fold_tail=true (and no "
                         f"ffa_after) turns into the next adapter; {fed.method} would send un-noised client factors")
    if ranks is not None and len(set(ranks.values())) > 1:
        raise ValueError(f"{key}: client-level DP needs one LoRA rank for every client, "
                         f"got {sorted(set(ranks.values()))}")
    n = cfg.partition.num_clients
    delta = check_delta(p.client_delta, n) if p.client_delta is not None else default_delta(n)
    q = fed.clients_per_round / n
    if p.client_noise_multiplier is not None:
        return ClientDP(p.client_noise_multiplier, p.client_clip, q, n, delta, p.accountant)
    return ClientDP.for_target(p.client_epsilon, fed.rounds, clip=p.client_clip, sample_rate=q, num_clients=n,
                               delta=delta, accountant=p.accountant)


def calibrated_rounds(raw: dict) -> int | None:
    """The rounds a saved run's DP noise was calibrated for (it has a target epsilon), else None: such a run
    cannot be extended, since its noise would then overspend the target."""
    p = raw.get("privacy") or {}
    if p.get("target_epsilon") is None and p.get("client_epsilon") is None:
        return None
    return int(raw["federation"]["rounds"])


def poisson_clients(ids: list[str], sample_rate: float, rng: np.random.Generator) -> list[str]:
    """Each client in with probability ``sample_rate``, independently (what the accountant assumes)."""
    return [cid for cid, u in zip(ids, rng.random(len(ids))) if u < sample_rate]


def check_privacy(cfg, aggregator, train: TrainSettings) -> TrainSettings:
    """One-line errors for what DP cannot cover (before any data is read); the round's settings."""
    client_dp(cfg)
    if cfg.privacy.target_epsilon is None:
        return train
    if cfg.federation.method == "hierfedlora":
        raise ValueError("privacy.target_epsilon: DP-SGD is not supported with hierfedlora yet (its group rounds "
                         "would need their own accounting)")
    settings = dataclasses.replace(train, **aggregator.local_training(0))
    if aggregator.proximal_mu > 0 or settings.rank_penalty > 0:
        raise ValueError("privacy.target_epsilon: DP-SGD clips per-example gradients and cannot cover a proximal "
                         "term or a rank penalty; set them to 0 in federation.method_options")
    return settings
