"""Named random streams: every random draw of a run comes from ``(run seed, keys..., stream)``.

A stream is a numpy ``SeedSequence`` entropy list ``[seed, *keys, code]``; the code names what the draw is
for, so adding a new kind of draw never shifts an existing one, and a run resumed at round ``t`` draws
exactly what the uninterrupted run drew. Clients are keyed by their index in the federation (their ids
can be any string).
"""

from __future__ import annotations

import numpy as np

STREAMS = {
    "batches": 1,     # a client's local batch order: [seed, round, client_index, 1]
    "dropout": 2,     # torch's seed for a client's dropout masks: [seed, round, client_index, 2]
    "sampling": 7,    # the clients sampled in a round: [seed, round, 7]
    "dp_batches": 11,  # a client's DP-SGD Poisson samples: [seed, round, client_index, 11]
    "dp_noise": 12,    # torch's seed for a client's DP-SGD noise: [seed, round, client_index, 12]
    "client_dp_noise": 13,  # torch's seed for the server's client-level DP noise: [seed, round, 13]
}


def sequence(keys: list[int], stream: str) -> list[int]:
    """Entropy for ``np.random.default_rng``: ``keys`` (e.g. ``[seed, round, client_index]``) plus the code."""
    return [*keys, STREAMS[stream]]


def rng(keys: list[int], stream: str) -> np.random.Generator:
    return np.random.default_rng(sequence(keys, stream))


def integer(keys: list[int], stream: str) -> int:
    """One integer in ``[0, 2**62)`` from a stream (a seed for torch's generator)."""
    return int(rng(keys, stream).integers(2**62))
