"""Runtimes on one machine: clients trained one after another on the shared host model.

:class:`InProcessRuntime` hands tasks to :func:`~fedlora.sim.client.train_client` as objects. Its host is
the server's own model, so the frozen weights are already at the server's version: a task's catch-up
correction is counted (the strategy sizes it as a real client would receive it) but not folded again.
:class:`SerializingRuntime` is the stand-in for a remote runtime: every task and reply is encoded to bytes
and decoded before use, as a network would carry it, and the message headers are reported.
"""

from __future__ import annotations

from collections.abc import Callable

from ..protocol import ClientTask, decode_reply, decode_task, encode_reply, encode_task, message_sizes
from ..protocol.runtime import Exchange, Runtime
from .client import ClientData, train_client
from .host import ModelHost


class InProcessRuntime(Runtime):
    """Train every task on ``host`` with the client's own :class:`ClientData`."""

    def __init__(self, host: ModelHost, clients: dict[str, ClientData]):
        self.host = host
        self.clients = clients

    def _check_version(self, task: ClientTask) -> None:
        if task.catch_up_to is not None and task.catch_up_to != self.host.version:
            raise RuntimeError(
                f"task for client {task.client_id!r} expects frozen weights at round {task.catch_up_to}, "
                f"the host holds round {self.host.version}"
            )

    def exchange(self, tasks: dict[str, ClientTask], on_reply: Callable[[str], None] | None = None) -> Exchange:
        replies = {}
        for cid, task in tasks.items():
            self._check_version(task)
            replies[cid] = train_client(self.host, task, self.clients[cid])
            if on_reply is not None:
                on_reply(cid)
        return Exchange(replies)


class SerializingRuntime(InProcessRuntime):
    """In-process training, but each task and reply crosses as bytes (a stand-in for a remote runtime)."""

    def exchange(self, tasks: dict[str, ClientTask], on_reply: Callable[[str], None] | None = None) -> Exchange:
        replies, headers, wire = {}, {}, {}
        for cid, task in tasks.items():
            task_bytes = encode_task(task)
            received = decode_task(task_bytes)
            self._check_version(received)
            reply_bytes = encode_reply(train_client(self.host, received, self.clients[cid]))
            replies[cid] = decode_reply(reply_bytes)
            sizes = [message_sizes(task_bytes), message_sizes(reply_bytes)]
            headers[cid] = sum(s["header_bytes"] for s in sizes)
            wire[cid] = sum(s["tensor_bytes"] for s in sizes)
            if on_reply is not None:
                on_reply(cid)
        return Exchange(replies, header_bytes=headers, wire_tensor_bytes=wire)
