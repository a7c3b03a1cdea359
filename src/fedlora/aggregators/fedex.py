"""FedEx-LoRA: exact aggregation by folding the averaging residual into the frozen weight.

Singhal et al., "FedEx-LoRA: Exact Aggregation for Federated and Efficient Fine-Tuning of Foundation
Models", 2024, arXiv:2410.09432.

.. math::

    B = \\sum_k p_k B_k, \\quad A = \\sum_k p_k A_k, \\quad
    W \\leftarrow W + s \\Big(\\sum_k p_k B_k A_k - B A\\Big) = W + s \\sum_k p_k (B_k - B)(A_k - A).

Exact for any weights. Factors are kept (not re-initialised). Deviation from the public code: the residual
is shipped as factors of inner dimension ``(K - 1) r`` (its rank bound), not as a dense ``d_out x d_in``
matrix, unless dense is smaller. A client that skipped rounds needs the sum of the corrections since it last
took part; the in-process engine folds them into the one shared base model, so that is automatic there.
"""

from __future__ import annotations

from .base import Aggregator, Round, register
from .rules import exact_residual, padded_mean


@register
class FedExLoRA(Aggregator):
    """Average the factors; fold the exact residual into ``W``."""

    name = "fedex"
    exact = True

    def _combine(self, rnd: Round):
        factors, corrections = {}, {}
        for m in rnd.modules:
            factors[m] = padded_mean(rnd, m)
            corrections[m] = exact_residual(rnd, m, factors[m])
        return factors, corrections
