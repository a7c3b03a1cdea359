"""Client devices and the simulated time of a round.

Each client is one device class (:class:`DeviceProfile`: training speed, uplink and downlink bandwidth,
memory). A client's time in a round is its local steps' FLOPs over its speed plus the bytes it receives and
sends over its bandwidths (METHODS.md, "Device time model"); the FLOPs of a step come from
:class:`fedlora.flops.ModelCost`. A synchronous round lasts as long as its slowest kept client; with a
deadline, clients slower than it are stragglers, dropped, and the server waits out the deadline.

Real devices vary from round to round (thermal throttling, other apps): ``jitter`` draws a lognormal
factor on a profile's speed, seeded per (round, client), so a run is reproducible.

Pure Python and numpy: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

_GIB = 1024**3


@dataclass(frozen=True)
class DeviceProfile:
    """One device class.

    Parameters
    ----------
    name : str
        Class name, e.g. ``"phone"``.
    speed : float
        FLOP/s of local training, ``> 0``.
    up : float
        Uplink bytes/s, ``> 0``.
    down : float
        Downlink bytes/s, ``> 0``.
    memory : float
        Bytes available for training, ``> 0``.
    jitter : float (default: 0.0)
        Sigma of a lognormal factor on ``speed``, drawn per (round, client); 0: deterministic.
    """

    name: str
    speed: float
    up: float
    down: float
    memory: float
    jitter: float = 0.0

    def __post_init__(self):
        for field_name in ("speed", "up", "down", "memory"):
            value = getattr(self, field_name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"device {self.name!r}: {field_name} must be > 0, got {value}")
        if not self.jitter >= 0:
            raise ValueError(f"device {self.name!r}: jitter must be >= 0, got {self.jitter}")


# Illustrative defaults, not measurements: a CPU laptop (~2e11 FLOP/s, 200/100 Mbit/s), and classes
# 2x and 4x slower in both compute and bandwidth with half and a quarter of its memory.
DEFAULT_CLASSES: dict[str, DeviceProfile] = {
    "fast": DeviceProfile("fast", speed=2e11, up=12.5e6, down=25e6, memory=8 * _GIB),
    "medium": DeviceProfile("medium", speed=1e11, up=6.25e6, down=12.5e6, memory=4 * _GIB),
    "slow": DeviceProfile("slow", speed=5e10, up=3.125e6, down=6.25e6, memory=2 * _GIB),
}


def assign_profiles(client_ids: Sequence[str], classes: Mapping[str, DeviceProfile],
                    proportions: Mapping[str, float], seed: int) -> dict[str, DeviceProfile]:
    """Give each client a device class, in the given proportions exactly.

    Counts are ``proportions * n`` rounded by largest remainder (ties to the class listed first), so they
    sum to ``n``; which client gets which class is a seeded shuffle.

    Parameters
    ----------
    client_ids : Sequence[str]
        The clients, ``n`` of them.
    classes : Mapping[str, DeviceProfile]
        Device classes by name.
    proportions : Mapping[str, float]
        Share of clients per class name, ``>= 0``; normalised by their sum (which must be ``> 0``).
    seed : int
        Seed of the shuffle (``np.random.default_rng([seed, 11])``).

    Returns
    -------
    dict[str, DeviceProfile]
        Each client's profile.
    """
    for name, share in proportions.items():
        if name not in classes:
            raise ValueError(f"proportions: unknown device class {name!r}; classes: {', '.join(classes)}")
        if not share >= 0:
            raise ValueError(f"proportions: share of {name!r} must be >= 0, got {share}")
    total = sum(proportions.values())
    if not total > 0:
        raise ValueError(f"proportions must have a positive sum, got {dict(proportions)}")
    if len(set(client_ids)) != len(client_ids):
        raise ValueError("client_ids has duplicates")
    n = len(client_ids)
    names = list(proportions)
    quotas = [proportions[name] / total * n for name in names]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(names)), key=lambda i: -(quotas[i] - counts[i]))  # stable: ties in order
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    slots = [name for name, count in zip(names, counts, strict=True) for _ in range(count)]
    order = np.random.default_rng([seed, 11]).permutation(n)
    return {cid: classes[slots[j]] for cid, j in zip(client_ids, order, strict=True)}


@dataclass(frozen=True)
class ClientTime:
    """Simulated seconds of one client's part of a round."""

    compute_s: float
    down_s: float
    up_s: float

    @property
    def total_s(self) -> float:
        return self.compute_s + self.down_s + self.up_s


def client_time(profile: DeviceProfile, step_flops: float, steps: int, bytes_down: int, bytes_up: int, *,
                speed_factor: float = 1.0) -> ClientTime:
    """Seconds to receive ``bytes_down``, run ``steps`` steps of ``step_flops`` each at
    ``profile.speed * speed_factor`` and send ``bytes_up``."""
    for name, value in (("step_flops", step_flops), ("steps", steps), ("bytes_down", bytes_down),
                        ("bytes_up", bytes_up)):
        if not value >= 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if not speed_factor > 0:
        raise ValueError(f"speed_factor must be > 0, got {speed_factor}")
    return ClientTime(compute_s=steps * step_flops / (profile.speed * speed_factor),
                      down_s=bytes_down / profile.down, up_s=bytes_up / profile.up)


def speed_factor(profile: DeviceProfile, seed: int, round_idx: int, client_index: int) -> float:
    """This round's factor on the client's speed: ``exp(N(0, jitter))``, 1.0 without jitter.

    Drawn from ``np.random.default_rng([seed, round_idx, client_index, 13])``: the same for the same
    (seed, round, client) whatever else the run draws.
    """
    if profile.jitter == 0:
        return 1.0
    if round_idx < 0 or client_index < 0:
        raise ValueError(f"round_idx and client_index must be >= 0, got {round_idx} and {client_index}")
    rng = np.random.default_rng([seed, round_idx, client_index, 13])
    return float(np.exp(rng.normal(0.0, profile.jitter)))


@dataclass(frozen=True)
class RoundTime:
    """Simulated wall-clock of one synchronous round."""

    wall_s: float                    # the deadline if anyone was dropped, else the slowest client's total
    slowest: str | None              # the slowest kept client (None: no client kept)
    stragglers: list[str] = field(default_factory=list)  # over the deadline, dropped
    times: dict[str, ClientTime] = field(default_factory=dict)  # every client's, stragglers included


def round_time(times: Mapping[str, ClientTime], deadline_s: float | None = None) -> RoundTime:
    """The round's wall-clock from its clients' times.

    Without a deadline the round lasts as long as its slowest client. With one, clients whose total
    exceeds it are stragglers (dropped); if there are any, the server waited until the deadline, so the
    round lasts exactly ``deadline_s``; else as long as its slowest client.
    """
    if deadline_s is not None and not deadline_s > 0:
        raise ValueError(f"deadline_s must be > 0, got {deadline_s}")
    late = {cid for cid, t in times.items() if deadline_s is not None and t.total_s > deadline_s}
    stragglers = [cid for cid in times if cid in late]
    kept = {cid: t.total_s for cid, t in times.items() if cid not in late}
    slowest = max(kept, key=kept.__getitem__) if kept else None
    wall = deadline_s if stragglers else (kept[slowest] if slowest is not None else 0.0)
    return RoundTime(wall_s=float(wall), slowest=slowest, stragglers=stragglers, times=dict(times))
