"""FlexLoRA: heterogeneous ranks through an SVD of the full-size mean update.

Bai et al., "Federated Fine-tuning of Large Language Models under Heterogeneous Tasks and Client
Resources", NeurIPS 2024, arXiv:2402.11505.

.. math::

    M = \\sum_k p_k s_k B_k A_k = U \\Sigma V^\\top, \\qquad
    \\text{client } k \\text{ receives } s_k B_k A_k = U_{r_k} \\Sigma_{r_k} V_{r_k}^\\top .

The global adapter keeps the top ``r`` (the largest client rank); the tail is dropped (inexact) and a client
of rank ``r_k < r`` also loses the components past ``r_k``. Factors use the balanced split, so the first
``r_k`` columns of the global adapter are the client's top-``r_k`` truncation.
"""

from __future__ import annotations

from .base import Aggregator, Round, register
from .rules import refactorized


@register
class FlexLoRA(Aggregator):
    """Top-``r`` SVD of the mean product; clients take their top ``r_k``."""

    name = "flexlora"
    exact = False

    def _combine(self, rnd: Round):
        return {m: refactorized(rnd, m, folded=False)[0] for m in rnd.modules}, {}
