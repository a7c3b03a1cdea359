"""FFA-LoRA: federated freeze-A LoRA.

Sun et al., "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024, arXiv:2403.12313.

.. math::

    A \\text{ frozen at a shared seeded init}, \\qquad B \\leftarrow \\sum_k p_k B_k .

Exact, since :math:`\\sum_k p_k B_k A = (\\sum_k p_k B_k) A`; half the uplink (only ``B`` is sent) and linear
in ``B``, so differential-privacy noise is not multiplied. Clients MUST keep ``A`` frozen; the server uses its
own ``A`` whatever a client sends. A client of rank ``r_k`` trains the first ``r_k`` rows of ``A``.
"""

from __future__ import annotations

from .base import Aggregator, Round, register
from .rules import frozen_a_mean


@register
class FFALoRA(Aggregator):
    """Freeze ``A``; average ``B``."""

    name = "ffa"
    exact = True

    def trains(self, round_idx: int) -> tuple[bool, bool]:
        return False, True

    def _combine(self, rnd: Round):
        return {m: frozen_a_mean(rnd, m) for m in rnd.modules}, {}
