"""FedIT: federated instruction tuning with plain FedAvg of the LoRA factors (the baseline).

Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", 2023, arXiv:2305.05644.

.. math::

    B \\leftarrow \\sum_k p_k B_k, \\qquad A \\leftarrow \\sum_k p_k A_k, \\qquad W \\text{ unchanged}.

Inexact: :math:`BA \\ne \\sum_k p_k B_k A_k` whenever clients differ; the base class measures by how much.
Clients train and send both factors. Clients of a lower rank are zero-padded (``B`` rescaled by
``s_k / s``).
"""

from __future__ import annotations

from .base import Aggregator, Round, register
from .rules import padded_mean


@register
class FedIT(Aggregator):
    """Average ``B`` and ``A`` separately."""

    name = "fedit"
    exact = False

    def _combine(self, rnd: Round):
        return {m: padded_mean(rnd, m) for m in rnd.modules}, {}
