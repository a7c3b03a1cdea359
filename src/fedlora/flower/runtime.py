"""A :class:`~fedlora.protocol.runtime.Runtime` on Flower's Message API, and the ClientApp side of it.

Server side, inside a ServerApp's ``main(grid, context)``: :class:`FlowerRuntime` wraps the
:class:`flwr.serverapp.Grid` and a mapping of fedlora client ids to Flower node ids (:func:`node_ids_for`
builds one from ``grid.get_node_ids()``). Each :meth:`~FlowerRuntime.exchange` sends one
:class:`flwr.app.Message` per task (``message_type`` ``"train"``, ``group_id`` the task's round, content
:func:`~fedlora.flower.records.task_to_content`) in one ``grid.send_and_receive`` call and decodes every
reply with :func:`~fedlora.flower.records.content_to_reply`. A message is built with Flower's own
constructor, which reads the run id from the process Flower sets up for a ServerApp; outside one it raises
``RuntimeError: TaskIdentity.run_id is not set.``.

Client side: :func:`train_handler` is the body of a ClientApp's ``@app.train()`` function.

Failures. A client's failure never raises: the client lands in ``Exchange.failed`` with one line naming its
node and client, e.g. ``node 12345 (client '3') lost: no reply within the 60 s timeout``. The cases:

* no reply (node lost, message expired, timeout): ``lost: no reply ...``;
* an error reply: ``lost: Flower error NODE_UNAVAILABLE (5): ...`` for Flower's own delivery errors
  (message, reply or node unavailable), ``failed: Flower error CLIENT_APP_RAISED_EXCEPTION (2): ...``
  for the others (the ClientApp raised, e.g. inside ``train_fn``, or could not decode its task);
* a reply whose content does not decode: ``sent a malformed reply: ...`` (the MessageError's text);
* a reply for another client or round: ``sent the reply of client 'x' round 4 to the task of round 3``;
* more than one reply to one task: ``sent 2 replies to one task``.

A reply is matched to its task by ``reply_to_message_id`` (Flower's grids write each sent message's id into
it on push), else by the node it came from; a reply that matches no task is logged and dropped.

Bytes. ``Exchange.header_bytes[client]`` counts, for the task and for a reply that decoded, the bytes of the
content beyond its tensor payloads that fedlora puts there: the JSON header string (UTF-8), each array's
name (UTF-8) and each ``.npy`` payload's own header (``len(array.data)`` minus the payload). It does not
count Flower's framing (message metadata, record and array descriptors, object ids, protobuf tags): those
are Flower's, and measuring them would mean serialising every tensor once more. A failed client's count is
its task's alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from flwr.app import ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from ..protocol import ClientReply, ClientTask, MessageError
from ..protocol.runtime import Exchange, Runtime
from .records import (
    HEADER_KEY,
    HEADER_RECORD,
    TENSOR_RECORD,
    content_tensor_bytes,
    content_to_reply,
    content_to_task,
    reply_to_content,
    task_to_content,
)

if TYPE_CHECKING:
    from flwr.serverapp import Grid

log = logging.getLogger("fedlora")

# Flower's error codes by number, for the reasons in Exchange.failed.
_ERROR_NAMES = {v: k for k, v in vars(ErrorCode).items() if k.isupper() and isinstance(v, int)}
# Error replies Flower itself writes when a message or its node went away: the client is "lost".
_LOST_CODES = {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE}
_REASON_CHARS = 300  # a client's error text is cut to this many characters
NODE_RECORD = "fedlora.node"  # a node query's record: the run's config out, partition and version back


class FlowerRuntime(Runtime):
    """Delivers tasks through a Flower ``Grid``: one ``"train"`` message per task, one send-and-receive.

    ``nodes`` maps each fedlora client id to its Flower node id (distinct ints). ``timeout`` (seconds, None:
    wait for every reply) goes to ``grid.send_and_receive``; ``ttl`` (seconds, None: Flower's default) is
    each message's time to live.
    """

    def __init__(self, grid: Grid, nodes: Mapping[str, int], *, timeout: float | None = None,
                 ttl: float | None = None):
        bad = [(c, n) for c, n in nodes.items()
               if not isinstance(c, str) or not isinstance(n, int) or isinstance(n, bool)]
        if bad:
            raise ValueError(f"nodes must map client ids (str) to Flower node ids (int), got {bad[0]!r:.80}")
        if len(set(nodes.values())) != len(nodes):
            raise ValueError("nodes must map each client to its own Flower node; two clients share one")
        for name, value in (("timeout", timeout), ("ttl", ttl)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not value > 0):
                raise ValueError(f"{name} must be a number > 0 or None, got {value!r}")
        self.grid = grid
        self.nodes = dict(nodes)
        self.timeout = timeout
        self.ttl = ttl
        self._client_ids: list[str] = []
        self._config_json = ""
        self._versions: dict[str, int] = {}  # reported by nodes, not yet handed to the strategy
        self._stale: set[str] = set()  # clients whose last task failed: their version is unknown

    # ------------------------------------------------------------ nodes
    def connect(self, client_ids: list[str], config_json: str, *, wait_s: float, poll_s: float = 0.5) -> list[str]:
        """Wait up to ``wait_s`` for one node per client, ask every node which partition it holds and at
        which frozen version, and map client ``client_ids[p]`` to the node of partition ``p``.

        The query carries the run's config (``config_json``): nodes build their data and model from it.
        Returns the clients left without a node (their tasks fail until one connects).
        """
        self._client_ids, self._config_json = list(client_ids), config_json
        deadline = time.monotonic() + wait_s
        while len(set(self.grid.get_node_ids())) < len(client_ids) and time.monotonic() < deadline:
            time.sleep(poll_s)
        self._versions.update(self._query(set(self.grid.get_node_ids())))
        return [c for c in client_ids if c not in self.nodes]

    def client_versions(self, client_ids: list[str]) -> dict[str, int]:
        """Versions nodes reported since the last call, plus those of ``client_ids`` whose last task failed
        or who have no node yet (their nodes, and any node not seen before, are asked again)."""
        unsure = [c for c in client_ids if c in self._stale or c not in self.nodes]
        if unsure and self._client_ids:
            ask = set(self.grid.get_node_ids()) - set(self.nodes.values())
            ask |= {self.nodes[c] for c in unsure if c in self.nodes}
            self._versions.update(self._query(ask))
        versions, self._versions = self._versions, {}
        self._stale -= set(versions)
        return versions

    def _query(self, node_ids: set[int]) -> dict[str, int]:
        """Ask ``node_ids`` for their partition and version; map the clients of those that answer."""
        if not node_ids:
            return {}
        content = RecordDict({NODE_RECORD: ConfigRecord({"config": self._config_json})})
        msgs = [Message(content, n, MessageType.QUERY, ttl=self.ttl) for n in sorted(node_ids)]
        versions: dict[str, int] = {}
        replies = list(self.grid.send_and_receive(msgs, timeout=self.timeout))
        asked = {m.metadata.message_id: m.metadata.dst_node_id for m in msgs if m.metadata.message_id}
        for msg in replies:  # Flower's own error replies come from the SuperLink: name the node we asked
            node = asked.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)
            try:
                if msg.has_error():
                    raise ValueError(_one_line(msg.error.reason))
                record = msg.content[NODE_RECORD]
                partition, version = int(record["partition"]), int(record["version"])
                if not 0 <= partition < len(self._client_ids):
                    raise ValueError(f"partition {partition} is outside 0..{len(self._client_ids) - 1}")
            except Exception as err:  # noqa: BLE001 - an untrusted node's answer: log it, skip the node
                log.warning("node %s did not say which client it holds: %s", node, _one_line(err))
                continue
            cid = self._client_ids[partition]
            if self.nodes.get(cid, node) != node:
                log.warning("client %r moved from node %s to node %s", cid, self.nodes[cid], node)
            self.nodes[cid] = node
            versions[cid] = version
        return versions

    def exchange(self, tasks: dict[str, ClientTask],
                 on_reply: Callable[[str], None] | None = None) -> Exchange:
        """Send every task, wait for the replies (up to ``timeout``), decode and check them.

        ``on_reply(client_id)`` is called, in task order, for each client whose reply decoded and matched.
        """
        failed: dict[str, str] = {}
        header_bytes: dict[str, int] = {}
        wire: dict[str, int] = {}
        sent: dict[str, Message] = {}
        for cid, task in tasks.items():
            if task.client_id != cid:
                raise ValueError(f"the task under client {cid!r} is addressed to client {task.client_id!r}")
            node = self.nodes.get(cid)
            if node is None:
                failed[cid] = f"client {cid!r} has no Flower node"
                continue
            content = task_to_content(task)
            header_bytes[cid] = content_header_bytes(content)
            wire[cid] = content_tensor_bytes(content)
            sent[cid] = Message(content, node, MessageType.TRAIN, ttl=self.ttl, group_id=str(task.round))

        received = list(self.grid.send_and_receive(list(sent.values()), timeout=self.timeout)) if sent else []

        by_id = {m.metadata.message_id: cid for cid, m in sent.items() if m.metadata.message_id}
        by_node = {m.metadata.dst_node_id: cid for cid, m in sent.items()}
        got: dict[str, list[Message]] = {}
        for msg in received:
            cid = by_id.get(msg.metadata.reply_to_message_id)
            if cid is None:
                cid = by_node.get(msg.metadata.src_node_id)
            if cid is None:
                log.warning("dropped a Flower reply from node %s that answers none of this exchange's tasks",
                            msg.metadata.src_node_id)
                continue
            got.setdefault(cid, []).append(msg)

        replies: dict[str, ClientReply] = {}
        for cid, msg in sent.items():
            who = f"node {msg.metadata.dst_node_id} (client {cid!r})"
            result = self._reply(tasks[cid], got.get(cid, []))
            if isinstance(result, str):
                failed[cid] = f"{who} {result}"
                continue
            reply, content = result
            replies[cid] = reply
            header_bytes[cid] += content_header_bytes(content)
            wire[cid] += content_tensor_bytes(content)
            if on_reply is not None:
                on_reply(cid)
        self._stale |= set(failed)
        return Exchange(replies, failed=failed, header_bytes=header_bytes, wire_tensor_bytes=wire)

    def _reply(self, task: ClientTask, msgs: list[Message]) -> tuple[ClientReply, RecordDict] | str:
        """The decoded reply and its content, or why there is none (the part after the node's name)."""
        if not msgs:
            within = f" within the {self.timeout:g} s timeout" if self.timeout is not None else ""
            return f"lost: no reply{within}"
        if len(msgs) > 1:
            return f"sent {len(msgs)} replies to one task"
        msg = msgs[0]
        if msg.has_error():
            code = msg.error.code
            name = _ERROR_NAMES.get(code, "UNKNOWN")
            verb = "lost" if code in _LOST_CODES else "failed"
            return f"{verb}: Flower error {name} ({code}): {_one_line(msg.error.reason)}"
        if not msg.has_content():
            return "sent a reply with neither content nor error"
        try:
            reply = content_to_reply(msg.content)
        except MessageError as err:
            return f"sent a malformed reply: {err}"
        except Exception as err:  # noqa: BLE001 - untrusted content; a decoder slip is that client's failure
            return f"sent a malformed reply: {type(err).__name__}: {_one_line(err)}"
        if reply.client_id != task.client_id or reply.round != task.round:
            return (f"sent the reply of client {reply.client_id!r} round {reply.round} "
                    f"to the task of round {task.round}")
        return reply, msg.content


def train_handler(train_fn: Callable[[ClientTask], ClientReply]) -> Callable[[Message, Context], Message]:
    """The body of a ClientApp's ``@app.train()`` function around ``train_fn(task) -> ClientReply``.

    A message whose content is not a task gets an error reply (``Message(Error(...), reply_to=msg)``, code
    ``CLIENT_APP_RAISED_EXCEPTION``, reason ``fedlora: cannot decode the task: ...``) and a warning in the
    log; nothing is raised. An exception inside ``train_fn`` (or a reply that cannot be encoded) propagates:
    Flower's ClientApp runner logs it and sends the server an error reply of the same code.

    Usage::

        app = ClientApp()

        @app.train()
        def train(msg: Message, context: Context) -> Message:
            return handler(msg, context)   # handler = train_handler(my_train_fn)
    """

    def handle(msg: Message, context: Context) -> Message:
        try:
            if not msg.has_content():
                raise MessageError("the message carries no content")
            task = content_to_task(msg.content)
        except MessageError as err:
            log.warning("cannot decode the task from the server: %s", err)
            error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                          reason=f"fedlora: cannot decode the task: {err}")
            return Message(error, reply_to=msg)
        return Message(reply_to_content(train_fn(task)), reply_to=msg)

    return handle


def node_ids_for(client_ids: list[str], node_ids: Iterable[int]) -> dict[str, int]:
    """Client ``client_ids[i]`` -> the ``i``-th smallest of the distinct ``node_ids`` (extra nodes unused)."""
    client_ids = list(client_ids)
    if len(set(client_ids)) != len(client_ids):
        raise ValueError("client ids must be distinct")
    nodes = sorted(set(node_ids))
    if len(nodes) < len(client_ids):
        raise ValueError(f"{len(client_ids)} clients need as many Flower nodes, the grid has {len(nodes)}")
    return dict(zip(client_ids, nodes))


def content_header_bytes(content: RecordDict) -> int:
    """Bytes of a task or reply content beyond its tensor payloads (see the module docstring).

    The JSON header string and array names as UTF-8, plus each ``.npy`` payload's header. ``content`` must
    be well formed (what :func:`~fedlora.flower.records.task_to_content` makes, or a reply that decoded).
    """
    header = content[HEADER_RECORD][HEADER_KEY]
    total = len(header.encode("utf-8", "replace"))
    for name, array in content[TENSOR_RECORD].items():
        total += len(name.encode("utf-8", "replace")) + len(array.data)
    return total - content_tensor_bytes(content)


def _one_line(text: object) -> str:
    line = " ".join(str(text).split()) if text is not None else "(no reason given)"
    return line if len(line) <= _REASON_CHARS else line[: _REASON_CHARS - 3] + "..."
