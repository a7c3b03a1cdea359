"""The learning rate across rounds: the server sets each round's rate in the task it sends (a client keeps
nothing between rounds, so every runtime follows the same schedule and a resumed run picks it up exactly).

For round ``t`` (0-based) of ``T``, with the configured rate ``lr``:

- ``constant``: ``lr``;
- ``linear``:   ``lr (1 - t / T)``, from ``lr`` in the first round to ``lr / T`` in the last;
- ``cosine``:   ``lr (1 + cos(pi t / T)) / 2``.

No round trains at rate 0. Inside a round, ``TrainSettings.warmup_steps`` still ramps each local run up.
"""

from __future__ import annotations

import math

LR_SCHEDULES = ("constant", "linear", "cosine")


def round_lr(lr: float, schedule: str, round_idx: int, rounds: int) -> float:
    """The learning rate of round ``round_idx`` (0-based) of ``rounds`` under ``schedule``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {', '.join(LR_SCHEDULES)}, got {schedule!r}")
    if not 0 <= round_idx < rounds:
        raise ValueError(f"round {round_idx} is outside the run's {rounds} rounds")
    progress = round_idx / rounds
    if schedule == "linear":
        return lr * (1.0 - progress)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr
