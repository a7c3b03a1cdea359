"""Simulated wall-clock time of a federation: each client's device, and what its part of a round costs.

A client's time in one exchange is its local steps' FLOPs (forward through every block, backward through
the blocks it trains: :class:`fedlora.flops.ModelCost`, counted from the model's own shapes) divided by its
device's speed, plus the bytes its task and reply actually carried divided by its bandwidth
(:mod:`fedlora.devices`). Exchanges of one lane (a HierFedLoRA group) add up; a synchronous round lasts as
long as its slowest lane. With a deadline, a client slower than it is a straggler: its reply is dropped and
the round waits until the deadline.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .. import devices, flops
from ..config import RunConfig
from ..devices import ClientTime, DeviceProfile
from ..protocol import ClientTask
from .client import local_steps

_EMA = 0.5  # weight of the newest measured speed factor when re-planning


class Clock:
    """Device profiles, the model's cost, and the simulated time of exchanges and rounds."""

    def __init__(self, cfg: RunConfig, model, client_ids: list[str], seq_lens: Mapping[str, float],
                 module_names: list[str]):
        dev = cfg.devices
        classes = {name: DeviceProfile(name=name, **c.model_dump()) for name, c in dev.classes.items()}
        if dev.assignment:
            self.profiles = {cid: classes[dev.assignment[i % len(dev.assignment)]] for i, cid in enumerate(client_ids)}
        else:
            self.profiles = devices.assign_profiles(client_ids, classes, dev.proportions, cfg.seed)
        self.index = {cid: i for i, cid in enumerate(client_ids)}
        self.cost = flops.ModelCost.from_model(model)
        self.blocks = flops.block_index(model, module_names)
        self.seq_lens = dict(seq_lens)
        self.batch_size = cfg.train.batch_size
        self.deadline = dev.deadline_s
        self.seed = cfg.seed
        self.measured: dict[str, float] = {}  # EMA of each client's realised speed factor

    # ------------------------------------------------------------ one exchange
    def depth_of(self, modules: list[str] | None) -> int:
        """Top blocks a task trains: every block, or down to the lowest block of ``modules``."""
        n = self.cost.num_blocks
        if modules is None:
            return n
        return n - min((self.blocks[m] for m in modules), default=n)

    def client_time(self, round_idx: int, task: ClientTask, num_examples: int, bytes_down: int,
                    bytes_up: int) -> ClientTime:
        cid = task.client_id
        profile = self.profiles[cid]
        factor = devices.speed_factor(profile, self.seed, round_idx, self.index[cid])
        self.measured[cid] = factor if cid not in self.measured else (1 - _EMA) * self.measured[cid] + _EMA * factor
        step = self.cost.step(self.batch_size, self.seq_lens[cid], self.depth_of(task.modules)).total
        steps = local_steps(task.train, num_examples)
        return devices.client_time(profile, step, steps, bytes_down, bytes_up, speed_factor=factor)

    def stragglers(self, times: Mapping[str, ClientTime]) -> dict[str, str]:
        """Clients over the deadline, with the reason their reply is dropped."""
        if self.deadline is None:
            return {}
        return {cid: f"straggler: {t.total_s:.1f} simulated s > deadline {self.deadline:g} s"
                for cid, t in times.items() if t.total_s > self.deadline}

    # ------------------------------------------------------------ a round
    def round_time(self, exchanges: list[dict[str, ClientTime]], lanes: Mapping[str, int]) -> float:
        """Slowest lane's sum over exchanges of its slowest client (the deadline caps each exchange)."""
        totals: dict[int, float] = {}
        for times in exchanges:
            per_lane: dict[int, float] = {}
            for cid, t in times.items():
                spent = t.total_s if self.deadline is None else min(t.total_s, self.deadline)
                per_lane[lanes[cid]] = max(per_lane.get(lanes[cid], 0.0), spent)
            for lane, spent in per_lane.items():
                totals[lane] = totals.get(lane, 0.0) + spent
        return max(totals.values(), default=0.0)

    # ------------------------------------------------------------ what the planner needs
    def speed(self, cid: str) -> float:
        """The client's speed as measured so far (its profile's until it has trained)."""
        return self.profiles[cid].speed * self.measured.get(cid, 1.0)

    def step_seconds(self, cid: str, depth: int) -> float:
        return self.cost.step(self.batch_size, self.seq_lens[cid], depth).total / self.speed(cid)

    def memory(self, cid: str, depth: int) -> float:
        return self.cost.memory_bytes(self.batch_size, self.seq_lens[cid], depth)

    def state(self) -> dict:
        return {"measured": dict(self.measured)}

    def load_state(self, state: dict) -> None:
        self.measured = {cid: float(v) for cid, v in state.get("measured", {}).items()}


def mean_lengths(encoded: dict, indices: Mapping[str, np.ndarray]) -> dict[str, float]:
    """Each client's mean tokens per example (its attention mask), the ``T`` of its step cost."""
    mask = encoded.get("attention_mask")
    if mask is None:
        width = float(encoded["input_ids"].shape[1])
        return {cid: width for cid in indices}
    lengths = mask.sum(1).double().numpy()
    return {cid: float(lengths[idx].mean()) if len(idx) else 1.0 for cid, idx in indices.items()}


def client_ranks(cfg: RunConfig, client_ids: list[str], profiles: dict) -> dict[str, int]:
    """Each client's LoRA rank: ``lora.client_ranks`` cycled, or by device class, or ``lora.rank``."""
    ranks = cfg.lora.client_ranks
    if isinstance(ranks, dict):
        return {cid: ranks.get(profiles[cid].name, cfg.lora.rank) for cid in client_ids}
    ranks = ranks or [cfg.lora.rank]
    return {cid: ranks[i % len(ranks)] for i, cid in enumerate(client_ids)}
