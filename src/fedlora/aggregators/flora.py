"""FLoRA: stack the client adapters, merge them into ``W``, start fresh adapters.

Wang et al., "FLoRA: Federated Fine-Tuning Large Language Models with Heterogeneous Low-Rank Adaptations",
NeurIPS 2024, arXiv:2409.05425.

.. math::

    W \\leftarrow W + [\\,p_1 s_1 B_1, \\dots, p_K s_K B_K\\,]\\,[A_1; \\dots; A_K]
    = W + \\sum_k p_k s_k B_k A_k, \\qquad B \\leftarrow 0, \\; A \\leftarrow \\text{fresh init}.

Exact for any ranks ``r_k``. The stacked correction (inner dimension ``sum_k r_k``) is the downlink, so it
grows with the clients. The fresh ``A`` is seeded by ``(seed, round, module)``: every party can recreate it.
"""

from __future__ import annotations

import math
import zlib

import torch

from .. import lowrank
from ..types import LoRAFactors
from .base import Aggregator, Round, register


@register
class FLoRA(Aggregator):
    """Merge the stacked adapters into ``W``; re-initialise the adapter."""

    name = "flora"
    exact = True

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _combine(self, rnd: Round):
        factors, corrections = {}, {}
        for m in rnd.modules:
            g = rnd.global_state[m].factors
            corrections[m] = rnd.mean_update(m)
            gen = torch.Generator().manual_seed(zlib.crc32(f"{self.seed}:{rnd.round_idx}:{m}".encode()))
            bound = 1.0 / math.sqrt(g.A.shape[1])  # PEFT's kaiming_uniform(a=sqrt(5)) bound for A
            A = ((torch.rand(g.A.shape, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(g.A)
            factors[m] = LoRAFactors(torch.zeros_like(g.B), A, g.scale)
        return factors, {m: lowrank.compact(c) for m, c in corrections.items()}
