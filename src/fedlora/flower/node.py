"""A federation node's own side: its partition's data and its own copy of the model, at a frozen version.

On Flower every node trains on its own model, so unlike the in-process runtime (whose clients share the
server's weights) a node must keep its frozen weights in step with the server: each task carries the
corrections folded since the version the server believes the node holds (``catch_up_from``), and the node
folds them before training (:meth:`ClientNode.train`). A node that holds a version the task does not start
from can only be helped by a catch-up from the base model: the server sends one when the node reports its
version (:meth:`~fedlora.protocol.runtime.Runtime.client_versions`), and the node restores its base weights.

Nodes in one process (Flower's simulation runs many in one worker) share the dataset and a pristine model,
loaded once per config; each node owns a deep copy of the model. A deployed SuperNode runs every message in
a fresh process: the node's frozen terms and version then persist in Flower's ``context.state``
(:meth:`ClientNode.save_frozen` / :meth:`ClientNode.restore_frozen`), and the process rebuilds from them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import tempfile
import threading
from pathlib import Path

import safetensors.torch
import torch

from .. import adapters
from ..config import RunConfig, config_from_dict
from ..protocol import ClientReply, ClientTask
from ..protocol.history import exact_sum
from ..sim.client import ClientData, train_client
from ..sim.data import FederatedData, build_federated_data
from ..sim.host import ModelHost
from ..types import LowRank


class NodeStateError(RuntimeError):
    """The node's frozen weights are not at the version a task starts from."""


class _Shared:
    """What every node of one config in this process reads: the encoded dataset and a pristine model."""

    def __init__(self, cfg: RunConfig, work_dir: Path):
        self.data: FederatedData = build_federated_data(cfg, work_dir)
        base, tokenizer = adapters.load_base_model(cfg.model, self.data.num_labels, cfg.seed)
        self.data.encode(tokenizer, cfg.model.max_length)
        self.model = adapters.attach_lora(base, cfg.lora, cfg.model.task_type, cfg.train.gradient_checkpointing)


_SHARED: dict[str, _Shared] = {}
_NODES: dict[tuple[str, int], ClientNode] = {}
_LOCK = threading.Lock()


def config_key(config_json: str) -> str:
    return hashlib.sha256(config_json.encode()).hexdigest()[:16]


class ClientNode:
    """Client ``partition`` of the run described by ``cfg``: trains tasks on its own model."""

    def __init__(self, cfg: RunConfig, partition: int, shared: _Shared):
        ids = shared.data.client_ids
        if not 0 <= partition < len(ids):
            raise ValueError(f"node config partition-id={partition} is outside the run's "
                             f"{len(ids)} partitions (0..{len(ids) - 1})")
        self.client_id = ids[partition]
        d = shared.data
        self.data = ClientData(d.train, d.train_indices[self.client_id], d.histograms[self.client_id])
        self.host = ModelHost(copy.deepcopy(shared.model), cfg.lora, cfg.model.task_type, [])
        # Only the LoRA-targeted weights ever change (folded corrections): keep their base values.
        self._base = {m: w.detach().clone()
                      for m, w in adapters.base_weights(self.host.layers, self.host.layers).items()}
        self.frozen: dict[str, LowRank] = {}  # everything folded since the base, as one product per module

    @property
    def version(self) -> int:
        return self.host.version

    def train(self, task: ClientTask) -> ClientReply:
        if task.client_id != self.client_id:
            raise ValueError(f"this node holds client {self.client_id!r}; the task is for {task.client_id!r}")
        self.catch_up(task)
        return train_client(self.host, task, self.data)

    def catch_up(self, task: ClientTask) -> None:
        """Bring the frozen weights to ``task.catch_up_to`` (no-op when already there)."""
        if task.catch_up_to is None or self.host.version == task.catch_up_to:
            return
        if task.catch_up_from != self.host.version:
            if task.catch_up_from != 0:
                raise NodeStateError(
                    f"node of client {self.client_id!r} holds frozen weights of round {self.host.version}; the task "
                    f"catches up from round {task.catch_up_from} (the server resends from round 0 once the "
                    "node reports its version)")
            self._restore_base()
        self.host.fold(task.catch_up)
        self.host.version = task.catch_up_to
        for m, term in task.catch_up.items():
            self.frozen[m] = exact_sum([self.frozen[m], term]) if m in self.frozen else term

    # Flower may run each message in a fresh process (a deployed SuperNode does): the node's frozen state
    # then lives in the node's context.state between messages, as these bytes (safetensors).
    def save_frozen(self) -> bytes:
        tensors = {}
        for m, term in self.frozen.items():
            tensors[f"left.{m}"], tensors[f"right.{m}"] = term.left.contiguous(), term.right.contiguous()
        return safetensors.torch.save(tensors)

    def restore_frozen(self, data: bytes, version: int) -> None:
        """Base weights plus the folded terms ``data`` (from :meth:`save_frozen`), at round ``version``."""
        tensors = safetensors.torch.load(data) if data else {}
        frozen = {m.removeprefix("left."): LowRank(t, tensors["right." + m.removeprefix("left.")])
                  for m, t in tensors.items() if m.startswith("left.")}
        unknown = sorted(set(frozen) - set(self.host.layers))
        if unknown:
            raise NodeStateError(f"the node's saved state names a module this model lacks: {unknown[0]!r}")
        self._restore_base()
        self.host.fold(frozen)
        self.host.version, self.frozen = version, frozen

    def _restore_base(self) -> None:
        with torch.no_grad():
            for m, w in adapters.base_weights(self.host.layers, self._base).items():
                w.copy_(self._base[m])
        self.host.version, self.frozen = 0, {}


def node_for(config_json: str, partition: int, data_dir: str | None = None) -> ClientNode:
    """This process's node for ``partition`` of the run whose config is ``config_json`` (built on first use).

    ``data_dir`` (the node's own ``data-dir`` node config) replaces the config's ``data.data_dir``: each
    machine keeps its data where it likes.
    """
    key = config_key(config_json)
    with _LOCK:
        node = _NODES.get((key, partition))
        if node is None:
            raw = json.loads(config_json)
            if data_dir:
                raw.setdefault("data", {})["data_dir"] = data_dir
            cfg = config_from_dict(raw)
            shared = _SHARED.get(key)
            if shared is None:
                with tempfile.TemporaryDirectory(prefix="fedlora-node-") as scratch:  # partition plots: unused
                    shared = _SHARED[key] = _Shared(cfg, Path(scratch))
            node = _NODES[(key, partition)] = ClientNode(cfg, partition, shared)
        return node
