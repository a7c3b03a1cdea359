"""HetLoRA: heterogeneous ranks by zero-padding and norm-weighted averaging (aggregation side).

Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of On-Device Foundation Models", EMNLP 2024,
arXiv:2401.06432.

.. math::

    q_k \\propto \\|s_k B_k A_k\\|_F, \\qquad
    B \\leftarrow \\sum_k q_k\\, \\tfrac{s_k}{s}\\,\\mathrm{pad}(B_k), \\quad
    A \\leftarrow \\sum_k q_k\\, \\mathrm{pad}(A_k), \\qquad \\text{client } k \\text{ gets the first } r_k
    \\text{ ranks}.

Inexact (factor averaging, and truncation for small clients). The aggregation error is still measured
against the data-weighted ideal ``sum_k p_k s_k B_k A_k``. The local rank self-pruning penalty belongs to
client training. If every client update is zero, ``q`` falls back to the data weights.
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

    def _combine(self, rnd: Round):
        norms = [
            sum(lowrank.frobenius_norm(c[m].as_lowrank()) ** 2 for m in rnd.modules) ** 0.5 for c in rnd.trained
        ]
        total = sum(norms)
        q = [n / total for n in norms] if total > 0 else rnd.weights
        return {m: padded_mean(rnd, m, q) for m in rnd.modules}, {}
