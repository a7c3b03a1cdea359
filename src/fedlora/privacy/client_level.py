"""Client-level DP at the server: DP-FedAvg with a fixed denominator, released as FRA's rank-``r`` split.

McMahan, Ramage, Talwar and Zhang, "Learning Differentially Private Recurrent Language Models", ICLR 2018
(the estimator with a fixed denominator). In round ``t`` every client joins by Poisson sampling at rate ``q``
out of ``N`` (``m = q N`` expected); client ``k`` of the sampled set ``S`` sends ``(B_k, A_k, h_k)``, and

.. math::

    \\Delta_k = \\big(s (B_{k,j} A_{k,j} - B_{0,j} A_{0,j})\\big)_j \\oplus (h_k - h_0), \\qquad
    \\|\\Delta_k\\| \\le C \\text{ (clipped in factor space, } \\mathtt{clip\\_update}\\text{)},

    U = \\frac{1}{m} \\sum_{k \\in S} \\Delta_k + \\mathcal{N}(0, \\sigma^2 I), \\qquad \\sigma = z C / m .

Adding or removing one client moves ``(1/m) sum_k Delta_k`` by at most ``C / m`` (the denominator does not
depend on who came), so each round is the sampled Gaussian mechanism with noise multiplier ``z`` at rate
``q``; over ``T`` rounds Opacus's accountant of ``[(z, q, T)]`` gives epsilon at ``delta`` (< ``1/N``).

The server then sets ``W_j <- W_j + U_j`` and the head ``h <- h_0 + U_h``. What every client receives next
is a function of ``U`` only (post-processing): the new adapter is the top-``r`` SVD of ``s B_0 A_0 + U_j``
and the rest is folded into ``W`` as the round's correction (FRA with ``fold_tail``; any method whose
downlink carries un-noised client factors would leak them, which is why only that rule is offered).
The noise is drawn from the named stream ``client_dp_noise`` of ``[seed, round]``, never reused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from .. import lowrank
from ..types import LoRAFactors, LowRank
from .accounting import epsilon_spent, noise_multiplier
from .bounds import clip_update, towards_head, update_norm


@dataclass(frozen=True)
class ClientDP:
    """The mechanism's constants: ``z``, ``C``, ``q``, ``N``, ``delta`` and the accountant."""

    noise_multiplier: float
    clip: float
    sample_rate: float
    num_clients: int
    delta: float
    accountant: str = "rdp"

    @property
    def expected_clients(self) -> float:
        """``m = q N``, the fixed denominator."""
        return self.sample_rate * self.num_clients

    @property
    def noise_std(self) -> float:
        """``sigma = z C / m`` on every coordinate of the released update (0 when ``z = 0``)."""
        return 0.0 if self.noise_multiplier == 0 else self.noise_multiplier * self.clip / self.expected_clients

    def epsilon(self, rounds: int) -> float:
        """Epsilon at ``delta`` after ``rounds`` released updates (inf without noise)."""
        if rounds <= 0:
            return 0.0
        if self.noise_multiplier == 0 or not math.isfinite(self.clip):
            return math.inf
        return epsilon_spent([(self.noise_multiplier, self.sample_rate, rounds)], self.delta, self.accountant)

    @classmethod
    def for_target(cls, target_epsilon: float, rounds: int, *, clip: float, sample_rate: float, num_clients: int,
                   delta: float, accountant: str = "rdp") -> ClientDP:
        """The smallest ``z`` whose ``rounds`` releases at ``sample_rate`` spend at most ``target_epsilon``."""
        z = noise_multiplier(target_epsilon, delta, sample_rate, rounds, accountant)
        return cls(z, clip, sample_rate, num_clients, delta, accountant)


@dataclass
class Release:
    """One round's released update: the new adapters, the tails to fold, the new head, who was clipped."""

    factors: dict[str, LoRAFactors]
    tails: dict[str, LowRank]
    head: dict[str, Tensor]
    clipped: dict[str, float]
    errors: dict[str, float]  # per module ||s B A + tail - (s B_0 A_0 + U)|| / ||s B_0 A_0 + U||, as stored
    error: float  # the same over all modules together


def _noise(shape, std: float, generator: torch.Generator) -> Tensor:
    return torch.randn(shape, generator=generator, dtype=torch.float64) * std


def release(dp: ClientDP, start: dict[str, LoRAFactors], head: dict[str, Tensor],
            clients: dict[str, tuple[dict[str, LoRAFactors], dict[str, Tensor]]], noise_seed: int,
            split: str = "balanced") -> Release:
    """The round's DP release from ``clients[cid] = (factors, head)``, every one trained from ``start``/``head``.

    Computed in float64 and stored in the factors' dtype. With ``z = 0`` and ``C = inf`` and ``m`` equal to
    the number of clients this is FRA-with-fold of the uniform mean, exactly.
    """
    m = dp.expected_clients
    clipped, kept = {}, {}
    for cid, (factors, client_head) in clients.items():
        heads = (head, client_head)
        norm = update_norm(start, factors, heads) if math.isfinite(dp.clip) else 0.0
        if norm > dp.clip:  # only then search for the fraction that brings it within C
            factors, t = clip_update(start, factors, dp.clip, heads)
            client_head = towards_head(head, client_head, t)
            clipped[cid] = norm
        kept[cid] = (factors, client_head)
    generator = torch.Generator().manual_seed(noise_seed)
    std = dp.noise_std
    factors_out, tails, errors, num_sq, den_sq = {}, {}, {}, 0.0, 0.0
    for name in sorted(start):  # a fixed order: the noise of a module never depends on the others' shapes
        g = start[name]
        dtype = g.B.dtype
        terms = [LowRank(g.scale * g.B.double(), g.A.double())]
        coeffs = [1.0 - len(kept) / m]
        for factors, _ in kept.values():
            f = factors.get(name, g)  # a module the client did not train: no change
            terms.append(LowRank(f.scale * f.B.double(), f.A.double()))
            coeffs.append(1.0 / m)
        product = lowrank.densify(lowrank.concat(terms, coeffs))
        if std > 0:
            product = product + _noise(product.shape, std, generator)
        eye = torch.eye(product.shape[1], dtype=torch.float64)
        top, tail, _ = lowrank.truncate(LowRank(product, eye), g.rank, split)
        new = lowrank.factors_from_product(top, g.scale, split)
        factors_out[name] = LoRAFactors(new.B.to(dtype), new.A.to(dtype), g.scale)
        tails[name] = LowRank(tail.left.to(dtype), tail.right.to(dtype))
        stored = (g.scale * factors_out[name].B.double() @ factors_out[name].A.double()
                  + tails[name].left.double() @ tails[name].right.double())
        num, den = float((stored - product).norm()), float(product.norm())
        errors[name], num_sq, den_sq = num / max(den, 1e-300), num_sq + num**2, den_sq + den**2
    new_head = {}
    for k in sorted(head):
        h0 = head[k].double()
        total = sum((client_head[k].double() - h0 for _, client_head in kept.values()), torch.zeros_like(h0))
        value = h0 + total / m
        if std > 0:
            value = value + _noise(h0.shape, std, generator)
        new_head[k] = value.to(head[k].dtype)
    return Release(factors_out, tails, new_head, clipped, errors, math.sqrt(num_sq) / max(math.sqrt(den_sq), 1e-300))
