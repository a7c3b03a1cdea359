"""HEXA: heterogeneity-aware exact aggregation.

Garofalo et al., "HEXA: Heterogeneity-aware Exact Aggregation for Efficient Fine-Tuning in Federated
Learning", 2025. The method text is not public; this is the project's design (``METHODS.md``), in four
parts, each switchable. With every part off it is FedEx-LoRA.

1. Weights (``beta > 0``): :math:`p_k \\propto n_k\\, e^{-\\beta \\delta_k}` with
   ``divergence="cosine"``: :math:`\\delta_k = 1 - \\cos(U_k, \\bar U)`, :math:`U_k` client ``k``'s update to
   the model over all modules, :math:`\\bar U = \\sum_k \\tfrac{n_k}{n} U_k` (inner products from factors), or
   ``divergence="label_kl"``: :math:`\\delta_k = \\mathrm{KL}(h_k \\,\\|\\, h)`, ``h`` the pooled label histogram.
   The same ``p_k`` serve every module and the ideal the error is measured against.
2. Re-factorise (``refactorize``): :math:`M = \\sum_k p_k (s_k B_k A_k + F_k) = U\\Sigma V^\\top`, next adapter
   :math:`sBA = U_r\\Sigma_r V_r^\\top` (balanced split), :math:`W \\leftarrow W + (M - sBA)`: the adapter keeps
   the dominant consensus directions and the fold is the smallest possible (Eckart-Young). Off: FedEx's
   factor means and residual.
3. Exact heterogeneous ranks (``rank_exact``): a client of rank :math:`r_k < r` trains the top-:math:`r_k`
   part of the global adapter and holds the rest, :math:`F_k`, as a frozen low-rank term, so every client
   starts from exactly the global model. Off: it gets the first :math:`r_k` components (inexact there).
4. Drift control (``proximal_mu``): the client adds :math:`\\tfrac{\\mu}{2}\\|BA - B_0A_0\\|_F^2`
   (:func:`fedlora.lowrank.proximal_penalty`); the server side only carries ``mu`` to the client.
"""

from __future__ import annotations

import math

import torch

from .. import lowrank
from ..types import AggregationInputError, ClientPayload, LoRAFactors
from .accounting import move_gram
from .base import Aggregator, Round, register
from .rules import exact_residual, padded_mean, refactorized


@register
class HEXA(Aggregator):
    """Divergence-aware weights, exact mean product re-factorised by SVD, exact heterogeneous ranks."""

    name = "hexa"
    exact = True

    def __init__(
        self,
        beta: float = 1.0,
        divergence: str = "cosine",
        refactorize: bool = True,
        rank_exact: bool = True,
        proximal_mu: float = 0.0,
    ):
        if not (math.isfinite(beta) and beta >= 0):
            raise ValueError(f"hexa: beta must be finite and >= 0, got {beta}")
        if divergence not in ("cosine", "label_kl"):
            raise ValueError(f"hexa: divergence must be 'cosine' or 'label_kl', got {divergence!r}")
        if not (math.isfinite(proximal_mu) and proximal_mu >= 0):
            raise ValueError(f"hexa: proximal_mu must be finite and >= 0, got {proximal_mu}")
        self.beta = beta
        self.divergence = divergence
        self.refactorize = refactorize
        self.rank_exact = rank_exact
        self.proximal_mu = proximal_mu

    # part 1 ------------------------------------------------------------------
    def client_weights(self, rnd: Round) -> list[float]:
        if self.beta == 0:
            return rnd.weights
        delta = self._label_kl(rnd) if self.divergence == "label_kl" else self._cosine_divergence(rnd)
        # Shift by the smallest divergence among weighted clients: same normalised weights, and
        # exp() cannot underflow to an all-zero total for large beta.
        low = min((d for p, d in zip(rnd.weights, delta) if p > 0), default=0.0)
        raw = [p * math.exp(-self.beta * (d - low)) for p, d in zip(rnd.weights, delta)]
        total = sum(raw)
        return [w / total for w in raw]

    @staticmethod
    def _cosine_divergence(rnd: Round) -> list[float]:
        # The moves' Gram (accounting.move_gram) gives every <u_j, u_k> without forming a move densely, from
        # the factors' changes where clients started from the global adapter (no cancellation), else in
        # float64; the error's denominator reuses it.
        n = len(rnd.updates)
        moves = torch.zeros(n, n, dtype=torch.float64)
        for m in rnd.global_state:
            moves += move_gram(rnd, m)
        p = torch.tensor(rnd.weights, dtype=torch.float64)
        dots, norms_sq, mean_sq = (moves @ p).tolist(), moves.diagonal().tolist(), float(p @ moves @ p)
        out = []
        for dot, nsq in zip(dots, norms_sq):
            den = math.sqrt(max(nsq, 0.0) * max(mean_sq, 0.0))
            out.append(1.0 - dot / den if den > 0 else 0.0)
        return out

    @staticmethod
    def _label_kl(rnd: Round) -> list[float]:
        hists = []
        for u in rnd.updates:
            if u.label_histogram is None:
                raise AggregationInputError("hexa divergence='label_kl' needs a label_histogram", client_id=u.client_id)
            h = torch.as_tensor(u.label_histogram, dtype=torch.float64).flatten()
            if (h.numel() != (hists[0].numel() if hists else h.numel()) or not torch.isfinite(h).all()
                    or (h < 0).any() or h.sum() <= 0):
                raise AggregationInputError(
                    "label_histogram must be finite, non-negative, non-empty and of one length",
                    client_id=u.client_id,
                )
            hists.append(h)
        pooled = torch.stack(hists).sum(0)
        pooled = pooled / pooled.sum()
        out = []
        for h in hists:
            q = h / h.sum()
            # 0 log 0 = 0; where q > 0 the pooled histogram is > 0 too, so no epsilon is needed.
            terms = torch.where(q > 0, q * (q / torch.where(q > 0, pooled, 1.0)).log(), 0.0)
            out.append(float(terms.sum()))
        return out

    # parts 2 and 3 ------------------------------------------------------------
    def _combine(self, rnd: Round):
        factors, corrections = {}, {}
        for m in rnd.modules:
            if self.refactorize:
                factors[m], corrections[m] = refactorized(rnd, m)
            else:
                factors[m] = padded_mean(rnd, m)
                corrections[m] = exact_residual(rnd, m, factors[m])
        return factors, corrections

    def _lower_rank_payload(self, g: LoRAFactors, rank: int) -> ClientPayload:
        if not self.rank_exact:
            return super()._lower_rank_payload(g, rank)
        # Top-r_k part trainable, the rest frozen: trainable + frozen == the global adapter exactly.
        head, tail, _ = lowrank.truncate(g.as_lowrank(), rank)
        client_scale = g.scale * g.rank / rank  # alpha / r_k
        return ClientPayload(lowrank.factors_from_product(head, client_scale), frozen=tail)
