"""HetLoRA: heterogeneous ranks by zero-padding and norm-weighted averaging (aggregation side).

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024,
arXiv:2401.06432.

.. math::

    q_k \\propto \\|s_k B_k A_k\\|_F, \\qquad
    B \\leftarrow \\sum_k q_k\\, \\tfrac{s_k}{s}\\,\\mathrm{pad}(B_k), \\quad
    A \\leftarrow \\sum_k q_k\\, \\mathrm{pad}(A_k), \\qquad \\text{client } k \\text{ gets the first } r_k
    \\text{ ranks}.

Inexact (factor averaging, and truncation for small clients). The aggregation error is still measured
against the data-weighted ideal ``sum_k p_k s_k B_k A_k``. If every client update is zero, ``q`` falls back
to the data weights.

Local rank self-pruning (client side, off unless ``prune_threshold > 0``): client ``k`` adds
``lambda * sum_{i in last delta ranks} ||b_i|| ||a_i||`` to its loss (``rank_penalty`` = lambda,
``penalty_ranks`` = delta); after training, trailing ranks whose share ``||b_i a_i^T||_F / ||B A||_F`` is
below ``prune_threshold`` (gamma) in every module are zeroed and the client trains the pruned rank from
the next round on (never below ``min_rank``).
"""

from __future__ import annotations

from .. import lowrank
from .base import Aggregator, Round, register
from .rules import padded_mean


@register
class HetLoRA(Aggregator):
    """Zero-pad to the global rank; average factors with weights proportional to update norms."""

    name = "hetlora"
    exact = False

    def __init__(self, rank_penalty: float = 0.0, penalty_ranks: int = 0, prune_threshold: float = 0.0,
                 min_rank: int = 1):
        checks = [
            (isinstance(rank_penalty, int | float) and rank_penalty >= 0, "rank_penalty must be a number >= 0"),
            (isinstance(penalty_ranks, int) and penalty_ranks >= 0, "penalty_ranks must be an int >= 0"),
            (isinstance(prune_threshold, int | float) and 0 <= prune_threshold < 1,
             "prune_threshold must lie in [0, 1)"),
            (isinstance(min_rank, int) and min_rank >= 1, "min_rank must be an int >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"hetlora: {message}")
        self.pruning = {"rank_penalty": float(rank_penalty), "penalty_ranks": penalty_ranks,
                        "prune_threshold": float(prune_threshold), "min_rank": min_rank}

    def local_training(self, round_idx: int) -> dict[str, object]:
        return dict(self.pruning)

    def _combine(self, rnd: Round):
        norms = [
            sum(lowrank.frobenius_norm(c[m].as_lowrank()) ** 2 for m in rnd.modules) ** 0.5 for c in rnd.trained
        ]
        total = sum(norms)
        q = [n / total for n in norms] if total > 0 else rnd.weights
        return {m: padded_mean(rnd, m, q) for m in rnd.modules}, {}
