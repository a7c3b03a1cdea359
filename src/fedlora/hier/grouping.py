"""Near-IID grouping of clients for HierFedLoRA (METHODS.md, "HierFedLoRA", part 1).

The HierFedLoRA text is not public; this is the project's design from its abstract. Clients are split
into ``G`` groups whose pooled label histograms are each close to the global one, so that many local
steps between intra-group syncs drift little (a near-IID group behaves like one IID client).

A group's score is

.. math:: D(\\text{mix}_g \\,\\|\\, \\text{global})
          + \\text{balance} \\cdot \\big(\\text{over}(n_g, N/G) + \\text{over}(s_g, S/G)\\big)

with ``mix_g`` the group's pooled histogram, ``D`` KL or L1 of normalised histograms, ``n`` examples
(histogram mass), ``s`` summed client speeds (only when speeds are given) and ``over(x, t) =
max(0, x / t - 1)`` the relative excess above the mean. Deterministic (no randomness):

1. Clients are taken by decreasing skew ``D(own || global)``, ties by id.
2. The ``G`` most skewed seed one group each: no group ends empty, and the hardest clients to balance
   start apart.
3. Each further client goes into the group whose score it raises least (the lowest index on ties).
4. Then, while some swap of two clients of different groups lowers the total score, the best one is made
   (group sizes in clients stay as the greedy left them).

Choices, measured on 200 random federations (8-40 clients, 2-10 classes, Dirichlet(0.05-1) mixes, 2-5
groups), as mean ``KL(group || global)`` over the mean of 20 random groupings of the same sizes. Step 3
ranks by the *change* of the score: ranking by the score after adding (the group that ends closest)
sends nearly every client to whichever group is already near-IID and leaves the skewed seeds alone; it
beat random in 44 of 200 (median ratio 1.56), the change in 199 (0.26). The swaps of step 4 fix what an
early greedy choice cannot undo: 200 of 200 (median 0.09, worst 0.86). ``balance=0.1`` (default) keeps
the largest group at a median 1.07x the mean size (1.34x with 0) for a small cost in divergence
(median ratio 0.09 against 0.06); ``balance=0`` ignores size and compute.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

DIVERGENCES = ("kl", "l1")


def _as_histogram(h, what: str) -> np.ndarray:
    """``h`` as a 1-D float64 array of finite non-negative entries with a positive sum."""
    h = np.asarray(h, dtype=np.float64)
    if h.ndim != 1 or h.size == 0:
        raise ValueError(f"{what} must be a non-empty 1-D histogram, got shape {h.shape}")
    if not np.all(np.isfinite(h)) or np.any(h < 0):
        raise ValueError(f"{what} must hold finite non-negative counts, got {h.tolist()}")
    if h.sum() <= 0:
        raise ValueError(f"{what} is empty (all counts are 0)")
    return h


def _normalised_pair(p, q) -> tuple[np.ndarray, np.ndarray]:
    """Two histograms of one length, each divided by its sum."""
    p = _as_histogram(p, "p")
    q = _as_histogram(q, "q")
    if p.shape != q.shape:
        raise ValueError(f"histograms differ in number of classes: {p.size} and {q.size}")
    return p / p.sum(), q / q.sum()


def _divergences(mixes: np.ndarray, global_p: np.ndarray, divergence: str, eps: float = 1e-12) -> np.ndarray:
    """``D(mix || global)`` over the last axis of ``mixes`` (each row with a positive sum), vectorised."""
    p = mixes / mixes.sum(axis=-1, keepdims=True)
    if divergence == "l1":
        return np.abs(p - global_p).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / np.maximum(global_p, eps)), 0.0)
    return terms.sum(axis=-1)


def kl_divergence(p: np.ndarray, q: np.ndarray, eps: float = 1e-12) -> float:
    """``KL(p || q)`` in nats of two label histograms.

    Parameters
    ----------
    p : np.ndarray
        Counts or probabilities per class; normalised here.
    q : np.ndarray
        Same length as ``p``; normalised here.
    eps : float (default: 1e-12)
        Floor on ``q``'s probabilities, so a class empty in ``q`` but not in ``p`` gives a large but
        finite term. Classes empty in ``p`` add 0. Same convention as
        ``fedlora.partition.kl_to_global``.

    Returns
    -------
    float
        ``sum_i p_i log(p_i / max(q_i, eps))``, ``>= 0`` up to rounding.
    """
    p, q = _normalised_pair(p, q)
    return float(_divergences(p, q, "kl", eps))


def l1_distance(p: np.ndarray, q: np.ndarray) -> float:
    """``sum_i |p_i - q_i|`` of the normalised histograms (twice the total variation), in ``[0, 2]``."""
    p, q = _normalised_pair(p, q)
    return float(_divergences(p, q, "l1"))


def mixed_histogram(histograms: Sequence[np.ndarray]) -> np.ndarray:
    """The pooled label histogram of a group: the sum of its members' counts (float64)."""
    if len(histograms) == 0:
        raise ValueError("mixed_histogram needs at least one histogram")
    arrays = [np.asarray(h, dtype=np.float64) for h in histograms]
    if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        raise ValueError(f"histograms differ in shape: {sorted({a.shape for a in arrays})}")
    return np.sum(arrays, axis=0)


@dataclass(frozen=True)
class Grouping:
    """Clients split into groups.

    Parameters
    ----------
    groups : list of list of str
        Client ids per group, each list in the order the clients were given to :func:`group_clients`.
    """

    groups: list[list[str]]

    def __post_init__(self):
        if not self.groups or any(len(g) == 0 for g in self.groups):
            raise ValueError(f"every group must hold at least one client, got sizes "
                             f"{[len(g) for g in self.groups]}")
        ids = [cid for g in self.groups for cid in g]
        if len(set(ids)) != len(ids):
            raise ValueError("a client appears in more than one group (or twice in one)")

    @property
    def clients(self) -> list[str]:
        """All client ids, group by group."""
        return [cid for g in self.groups for cid in g]

    def group_of(self, cid: str) -> int:
        """Index of the group holding client ``cid``."""
        for index, group in enumerate(self.groups):
            if cid in group:
                return index
        raise ValueError(f"client {cid!r} is in no group")

    def as_sets(self) -> set[frozenset[str]]:
        """The groups as a set of sets: equal for groupings that differ only in order."""
        return {frozenset(g) for g in self.groups}

    def mean_kl(self, histograms: Mapping[str, np.ndarray]) -> float:
        """Mean over groups of ``KL(group's mixed histogram || global)``; global = all grouped clients."""
        missing = [cid for cid in self.clients if cid not in histograms]
        if missing:
            raise ValueError(f"no histogram for clients {missing}")
        global_hist = mixed_histogram([histograms[cid] for cid in self.clients])
        return float(np.mean([kl_divergence(mixed_histogram([histograms[cid] for cid in g]), global_hist)
                              for g in self.groups]))


def _overshoot(value, mean: float):
    """Relative excess of ``value`` above ``mean``, 0 when at or below it (elementwise)."""
    return np.maximum(0.0, np.asarray(value, dtype=np.float64) / mean - 1.0)


class _Scorer:
    """Per-group score ``D(mix || global) + balance * (size and speed overshoot)``; lower is better."""

    def __init__(self, global_hist: np.ndarray, num_groups: int, divergence: str, balance: float,
                 total_speed: float | None):
        self.global_p = global_hist / global_hist.sum()
        self.mean_size = global_hist.sum() / num_groups
        self.mean_speed = None if total_speed is None else total_speed / num_groups
        self.divergence = divergence
        self.balance = balance

    def __call__(self, mixes: np.ndarray, speeds: np.ndarray) -> np.ndarray:
        penalty = _overshoot(mixes.sum(axis=-1), self.mean_size)
        if self.mean_speed is not None:
            penalty = penalty + _overshoot(speeds, self.mean_speed)
        return _divergences(mixes, self.global_p, self.divergence) + self.balance * penalty


def _best_swap(members, mixes, group_speed, score, hists, speeds) -> tuple[float, int, int, int, int]:
    """The swap of two clients of different groups that lowers the total score most: (change, a, i, b, j)."""
    best = (0.0, -1, -1, -1, -1)
    current = score(mixes, group_speed)
    for a in range(len(members)):
        ha = np.stack([hists[cid] for cid in members[a]])  # (n_a, C)
        sa = np.array([speeds[cid] for cid in members[a]])
        for b in range(a + 1, len(members)):
            hb = np.stack([hists[cid] for cid in members[b]])  # (n_b, C)
            sb = np.array([speeds[cid] for cid in members[b]])
            moved = hb[None, :, :] - ha[:, None, :]  # (n_a, n_b, C): what group a gains
            moved_speed = sb[None, :] - sa[:, None]
            change = (score(mixes[a] + moved, group_speed[a] + moved_speed)
                      + score(mixes[b] - moved, group_speed[b] - moved_speed) - current[a] - current[b])
            i, j = np.unravel_index(int(np.argmin(change)), change.shape)
            if change[i, j] < best[0]:
                best = (float(change[i, j]), a, int(i), b, int(j))
    return best


def group_clients(histograms: Mapping[str, np.ndarray], num_groups: int, *,
                  speeds: Mapping[str, float] | None = None, divergence: str = "kl",
                  balance: float = 0.1) -> Grouping:
    """Split clients into ``num_groups`` near-IID groups by the greedy rule of the module docstring.

    Parameters
    ----------
    histograms : Mapping[str, np.ndarray]
        Label counts per client id, all of one length, each with a positive sum.
    num_groups : int
        Number of groups ``G``, ``1 <= G <= len(histograms)``.
    speeds : Mapping[str, float] or None (default: None)
        Compute speed per client (any unit, ``> 0``); balances the groups' total speed. ``None``: ignored.
    divergence : str (default: "kl")
        ``"kl"`` (``KL(group || global)``) or ``"l1"`` (L1 of the normalised histograms).
    balance : float (default: 0.1)
        Weight, ``>= 0``, of the size and speed overshoot penalties.

    Returns
    -------
    Grouping
        ``num_groups`` non-empty groups, members in input order.
    """
    if not histograms:
        raise ValueError("group_clients needs at least one client")
    ids = list(histograms)
    hists = {cid: _as_histogram(histograms[cid], f"histogram of client {cid!r}") for cid in ids}
    if len({h.shape for h in hists.values()}) != 1:
        raise ValueError(f"client histograms differ in number of classes: "
                         f"{sorted({h.size for h in hists.values()})}")
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
            or not 1 <= num_groups <= len(ids):
        raise ValueError(f"num_groups must be an integer in [1, {len(ids)}] (the number of clients), "
                         f"got {num_groups!r}")
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not balance >= 0:
        raise ValueError(f"balance must be >= 0, got {balance}")
    if speeds is not None:
        missing = [cid for cid in ids if cid not in speeds]
        if missing:
            raise ValueError(f"no speed for clients {missing}")
        bad = {cid: speeds[cid] for cid in ids if not float(speeds[cid]) > 0}
        if bad:
            raise ValueError(f"speeds must be > 0, got {bad}")
    speed = {cid: float(speeds[cid]) if speeds is not None else 0.0 for cid in ids}

    global_hist = mixed_histogram(list(hists.values()))
    score = _Scorer(global_hist, num_groups, divergence,
                    balance, None if speeds is None else sum(speed.values()))
    skew = _divergences(np.stack([hists[cid] for cid in ids]), score.global_p, divergence)
    order = [ids[k] for k in sorted(range(len(ids)), key=lambda k: (-skew[k], ids[k]))]

    # Greedy: seed each group with one of the G most skewed clients, then place the rest one by one.
    members: list[list[str]] = [[cid] for cid in order[:num_groups]]
    mixes = np.stack([hists[cid] for cid in order[:num_groups]])  # (G, C)
    group_speed = np.array([speed[cid] for cid in order[:num_groups]])
    for cid in order[num_groups:]:
        change = score(mixes + hists[cid], group_speed + speed[cid]) - score(mixes, group_speed)
        best = int(np.argmin(change))  # first minimum: lowest group index on ties
        members[best].append(cid)
        mixes[best] += hists[cid]
        group_speed[best] += speed[cid]

    # Swaps: greedy placement cannot undo an early choice; swapping pairs (group sizes in clients kept)
    # while one lowers the total score fixes that. The total falls every step, so this ends; the cap is
    # a safety net.
    for _ in range(len(ids) ** 2):
        change, a, i, b, j = _best_swap(members, mixes, group_speed, score, hists, speed)
        if change > -1e-12:
            break
        ci, cj = members[a][i], members[b][j]
        members[a][i], members[b][j] = cj, ci
        mixes[a] += hists[cj] - hists[ci]
        mixes[b] += hists[ci] - hists[cj]
        group_speed[a] += speed[cj] - speed[ci]
        group_speed[b] += speed[ci] - speed[cj]

    position = {cid: i for i, cid in enumerate(ids)}
    return Grouping([sorted(g, key=position.__getitem__) for g in members])


def regroup(previous: Grouping, histograms: Mapping[str, np.ndarray], num_groups: int,
            **kwargs) -> tuple[Grouping, bool]:
    """Group again when clients joined or left (or ``num_groups`` changed); else keep ``previous``.

    Parameters
    ----------
    previous : Grouping
        The grouping in use.
    histograms : Mapping[str, np.ndarray]
        Label counts of the current clients.
    num_groups : int
        Number of groups wanted.
    **kwargs
        Passed to :func:`group_clients` (``speeds``, ``divergence``, ``balance``).

    Returns
    -------
    tuple of (Grouping, bool)
        The grouping to use, and whether its groups (as sets of clients) differ from ``previous``.
    """
    if set(previous.clients) == set(histograms) and len(previous.groups) == num_groups:
        return previous, False
    grouping = group_clients(histograms, num_groups, **kwargs)
    return grouping, grouping.as_sets() != previous.as_sets()
