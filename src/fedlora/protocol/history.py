"""Versioned history of the corrections the server folded into the frozen weights.

FedEx-LoRA, FRA with ``fold_tail`` and HEXA change the frozen weights ``W`` every round by a low-rank
correction (linear orientation, scale included). A client that last synced at round version ``t`` lacks
exactly the corrections of rounds ``t+1 .. latest``; :meth:`CorrectionHistory.since` gives their sum,
per module, still in factored form. Round ``r`` (1-based) is the correction folded at the end of round
index ``r - 1``, the numbering of the engine's checkpoints; version ``0`` is the base model.

The sum is exact: the factors are concatenated (``sum_i L_i R_i = [L_1 ... L_T] [R_1; ...; R_T]``) and only
re-compressed, by :func:`fedlora.lowrank.compact`, once the stacked inner dimension costs more than the
dense matrix. That re-compression drops only directions whose singular values are at float64 rounding
level (it runs in float64 and casts back), so the sum changes by rounding alone. It is not bit-identical to
folding the rounds one by one, as the server did; a runtime that needs that can fold :meth:`get` in order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .. import lowrank
from ..types import LowRank

Corrections = dict[str, LowRank]


class CorrectionHistory:
    """Corrections per round, so a client at any version can be brought up to date.

    Parameters
    ----------
    load : callable (default: None)
        ``load(round_number) -> {module: LowRank}``. When given, the history keeps no tensors: it reads
        every round it needs through ``load`` (e.g. from the round's checkpoint), and :meth:`append` only
        records that the round exists, so the round must be loadable before :meth:`since` asks for it.
        Without it, appended rounds are kept in memory.
    latest : int (default: 0)
        Rounds ``1 .. latest`` already exist (readable through ``load``); used when resuming a run.

    Examples
    --------
    >>> import torch
    >>> h = CorrectionHistory()
    >>> h.append(1, {"q": LowRank(torch.ones(4, 1), torch.ones(1, 3))})
    >>> h.append(2, {})
    >>> h.since(0)["q"].dense().sum().item(), h.since(1), h.latest
    (12.0, {}, 2)
    """

    def __init__(self, load: Callable[[int], Corrections] | None = None, latest: int = 0):
        if latest < 0 or (latest > 0 and load is None):
            raise ValueError(f"latest={latest} needs a loader for rounds 1..{latest} (and must be >= 0)")
        self._load = load
        self._latest = latest
        self._rounds: dict[int, Corrections] = {}

    @property
    def latest(self) -> int:
        """The newest round version held (0 when empty)."""
        return self._latest

    def append(self, round_number: int, corrections: Corrections) -> None:
        """Record the corrections folded in round ``round_number``, which must be ``latest + 1``."""
        if round_number != self._latest + 1:
            raise ValueError(f"expected round {self._latest + 1} next, got {round_number}")
        for module, c in corrections.items():
            if not isinstance(module, str) or not isinstance(c, LowRank):
                raise ValueError(
                    f"round {round_number}: expected {{module name: LowRank}}, "
                    f"got {module!r}: {type(c).__name__}"
                )
        if self._load is None:
            self._rounds[round_number] = dict(corrections)
        self._latest = round_number

    def get(self, round_number: int) -> Corrections:
        """The corrections of one round (``1 <= round_number <= latest``)."""
        if not 1 <= round_number <= self._latest:
            raise ValueError(f"round {round_number} is not in the history (rounds 1..{self._latest})")
        if self._load is None:
            return self._rounds[round_number]
        return self._load(round_number)

    def since(self, version: int) -> Corrections:
        """Sum of the corrections of rounds ``version + 1 .. latest`` per module, as compact products.

        Modules that no round in that range corrects (or corrects with rank 0) are absent, so
        ``since(latest)`` is ``{}``.
        """
        if not 0 <= version <= self._latest:
            raise ValueError(f"version {version} is outside the history (0..{self._latest})")
        terms: dict[str, list[LowRank]] = {}
        for r in range(version + 1, self._latest + 1):
            for module, c in self.get(r).items():
                if c.rank > 0:
                    terms.setdefault(module, []).append(c)
        out: Corrections = {}
        for module, parts in terms.items():
            try:
                out[module] = exact_sum(parts)
            except ValueError as err:
                raise ValueError(f"module {module!r}: {err}") from None
        return out

    def __len__(self) -> int:
        return self._latest


def exact_sum(parts: Sequence[LowRank]) -> LowRank:
    """``sum_i parts[i]`` as one product, re-compressed only where :func:`lowrank.compact` would.

    ``compact`` cuts singular values below ``8 eps max(m, n)`` of the largest: in float32 and at
    ``d = 4096`` that is 4e-3, enough to lose real directions of a many-round sum. The rank is decided in
    float64 (cut-off 7e-12 there) and the factors cast back to their dtype.
    """
    stacked = lowrank.concat(parts)
    if stacked.left.dtype == torch.float64:
        return lowrank.compact(stacked)
    wide = LowRank(stacked.left.double(), stacked.right.double())
    small = lowrank.compact(wide)
    if small is wide:  # no re-compression needed: keep the factors as they came, bit for bit
        return stacked
    return LowRank(small.left.to(stacked.left.dtype), small.right.to(stacked.right.dtype))
