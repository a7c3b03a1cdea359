"""FlowerRuntime and train_handler over a fake in-memory Grid: replies come back bit for bit, each task goes
to its node as a "train" message, every kind of client failure lands in ``Exchange.failed`` with one line
naming node and client while the other clients' replies come through, and the byte counts add up.

The fake Grid does what Flower 1.41's grids and ClientApp runner do around a message: it gives each pushed
message an id, moves messages and replies through Flower's object store bytes (deflate each nested object,
inflate from the bytes), runs the node's handler, and turns an exception raised in it into an error reply.
The reference for a reply is what the fake ``train_fn`` returns for the task. Builders and comparison are
copied, trimmed, from tests/flower/test_records.py.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402
from flwr.serverapp import Grid  # noqa: E402
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects  # noqa: E402
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents  # noqa: E402
from flwr.supercore.task_identity import TaskIdentity  # noqa: E402

from fedlora.flower import (  # noqa: E402
    HEADER_RECORD,
    TENSOR_RECORD,
    content_tensor_bytes,
    reply_to_content,
    task_to_content,
)
from fedlora.flower.runtime import (  # noqa: E402
    FlowerRuntime,
    content_header_bytes,
    node_ids_for,
    train_handler,
)
from fedlora.protocol import (  # noqa: E402
    ClientReply,
    ClientTask,
    reply_tensor_bytes,
    task_tensor_bytes,
)
from fedlora.types import LoRAFactors  # noqa: E402
from message_builders import assert_same  # noqa: E402
from flower_builders import make_task as records_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread", "serverapp_process")

ROUND = 4
RUN_ID = 77


@pytest.fixture
def serverapp_process(monkeypatch):
    """What Flower sets in a ServerApp's process, without which ``Message(...)`` cannot be built."""
    monkeypatch.setattr(TaskIdentity, "_run_id", RUN_ID)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # flwr.common.constant.SUPERLINK_NODE_ID
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


# ---------------------------------------------------------------- builders

def make_task(seed: int, client_id: str) -> ClientTask:
    """The records tests' task (every kind of field), as round ``ROUND``; odd seeds train a module subset
    and A, even ones every module and B only."""
    task = records_task(seed, client_id)
    return dataclasses.replace(task, round=ROUND, seed=[12345, ROUND, seed], catch_up_to=ROUND,
                               modules=task.modules if seed % 2 else None)


def fake_train(task: ClientTask) -> ClientReply:
    """Deterministic: the trained modules' factors and the head scaled by 2. A task that does not train A
    gets a B-only reply, whose A is zeros (what such a reply decodes to)."""
    modules = task.modules if task.modules is not None else list(task.adapter)
    a = (lambda t: 2 * t) if task.train_a else torch.zeros_like
    return ClientReply(
        round=task.round, client_id=task.client_id, rank=task.rank,
        factors={m: LoRAFactors(2 * task.adapter[m].B, a(task.adapter[m].A), task.adapter[m].scale)
                 for m in modules},
        head={k: 2 * v for k, v in task.head.items()},
        num_examples=10 + len(task.client_id), train_loss=1 / 3 + task.rank,
        label_histogram=torch.tensor([1.0, 0.0, float(task.rank)], dtype=torch.float64),
        metrics={"lr": task.train.lr}, sent_a=task.train_a,
    )


def raising_train(task: ClientTask) -> ClientReply:
    raise RuntimeError("CUDA out of memory\nwhile training")


def wrong_client_train(task: ClientTask) -> ClientReply:
    return dataclasses.replace(fake_train(task), client_id="someone-else")


def garbage_reply_handler(msg: Message, context: Context) -> Message:
    junk = RecordDict({HEADER_RECORD: ConfigRecord({"header": "{not json"}), TENSOR_RECORD: ArrayRecord()})
    return Message(junk, reply_to=msg)


# ---------------------------------------------------------------- comparison

# ---------------------------------------------------------------- the fake Grid

def over_the_wire(msg: Message) -> Message:
    """``msg`` after Flower's object store: every nested object deflated to bytes and inflated back.

    Deflating drops the message id (the link assigns it), so it is put back.
    """
    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(msg).items()}
    back = inflate_object_from_contents(msg.object_id, objects)
    assert isinstance(back, Message)
    back.metadata.__dict__["_message_id"] = msg.metadata.message_id
    return back


def wire_bytes(msg: Message) -> int:
    return sum(len(obj.deflate()) for obj in get_all_nested_objects(msg).values())


class FakeGrid(Grid):
    """Routes each message to its node's handler, in memory, the way Flower's grid and runner would.

    ``drop``: nodes whose reply is lost; ``repeat``: nodes whose reply arrives twice; ``garble_tasks``: nodes
    that receive junk content instead of the task; ``replace``: node -> ``fn(inbound, reply)`` giving the
    reply that arrives instead; ``set_ids=False``: a grid that writes no message ids (replies are then
    matched by node).
    """

    def __init__(self, handlers, *, drop=(), repeat=(), garble_tasks=(), replace=None, set_ids=True):
        self.handlers = handlers
        self.drop, self.repeat, self.garble_tasks = set(drop), set(repeat), set(garble_tasks)
        self.replace = replace or {}
        self.set_ids = set_ids
        self.sent: list[Message] = []  # what send_and_receive got, as the runtime built it
        self.timeouts: list = []
        self.wire: dict[int, tuple[int, int]] = {}  # node -> Flower's bytes of (task, reply) message

    # The abstract methods a ServerApp's grid has; this one needs no run and no link.
    def set_run(self, run) -> None:
        self._run = run

    @property
    def run(self):
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self):
        return list(self.handlers)

    def push_messages(self, messages):
        raise NotImplementedError  # the runtime uses send_and_receive only

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        replies = []
        for msg in messages:
            self.sent.append(msg)
            if self.set_ids:
                msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = msg.metadata.dst_node_id
            inbound = over_the_wire(msg)
            if node in self.garble_tasks:
                inbound.content = RecordDict({"junk": ConfigRecord({"x": 1})})
            context = Context(run_id=RUN_ID, node_id=node, node_config={}, state=RecordDict(), run_config={})
            try:
                reply = self.handlers[node](inbound, context)
            except Exception as ex:  # what flwr.supernode.runtime.run_clientapp does
                reason = str(type(ex)) + ":<'" + str(ex) + "'>"
                error = Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason)
                reply = Message(error, reply_to=inbound)
            if node in self.replace:
                reply = self.replace[node](inbound, reply)
            self.wire[node] = (wire_bytes(msg), wire_bytes(reply))
            if node in self.drop:
                continue
            reply = over_the_wire(reply)
            reply.metadata.__dict__["_message_id"] = str(uuid.uuid4()) if self.set_ids else ""
            replies += [reply] * (2 if node in self.repeat else 1)
        return replies


# ---------------------------------------------------------------- scenarios

CLIENTS = ["hospital-a", "0", "", "клиника/β 7", 'quote"back\\slash\nnewline']
NODES = [2**64 - 1, 3, 981_273_012_348_612_001, 17, 42]


def healthy(clients=CLIENTS, nodes=NODES, **grid_options):
    node_of = dict(zip(clients, nodes))
    tasks = {cid: make_task(i, cid) for i, cid in enumerate(clients)}
    grid = FakeGrid({n: train_handler(fake_train) for n in nodes}, **grid_options)
    return tasks, node_of, grid


def test_replies_come_back_bit_for_bit_from_the_right_nodes():
    tasks, node_of, grid = healthy()
    called = []
    runtime = FlowerRuntime(grid, node_of, timeout=30.0, ttl=600.0)
    exchange = runtime.exchange(tasks, on_reply=called.append)
    assert exchange.failed == {}
    assert list(exchange.replies) == CLIENTS and called == CLIENTS
    for cid, task in tasks.items():
        assert_same(fake_train(task), exchange.replies[cid], f"reply[{cid!r}]")
    assert grid.timeouts == [30.0]  # one send_and_receive for the whole exchange
    assert len(grid.sent) == len(tasks)
    for msg, (cid, task) in zip(grid.sent, tasks.items()):
        meta = msg.metadata
        assert (meta.dst_node_id, meta.message_type, meta.group_id, meta.ttl) == (node_of[cid], "train",
                                                                                 str(ROUND), 600.0)
        assert meta.run_id == RUN_ID
        assert content_tensor_bytes(msg.content) == task_tensor_bytes(task)


def test_replies_are_matched_by_node_when_the_grid_sets_no_message_ids():
    tasks, node_of, grid = healthy(set_ids=False)
    exchange = FlowerRuntime(grid, node_of).exchange(tasks)
    assert exchange.failed == {}
    for cid, task in tasks.items():
        assert_same(fake_train(task), exchange.replies[cid], f"reply[{cid!r}]")


def test_each_failure_names_node_and_client_and_the_others_come_through():
    good = ["a", "b", "c"]
    bad = {  # client -> (node, why, handler)
        "raises": (101, "failed: Flower error CLIENT_APP_RAISED_EXCEPTION (2):",
                   train_handler(raising_train)),
        "dropped": (102, "lost: no reply within the 5 s timeout", train_handler(fake_train)),
        "impostor": (103, "sent the reply of client 'someone-else' round 4 to the task of round 4",
                     train_handler(wrong_client_train)),
        "garbage": (104, "sent a malformed reply:", garbage_reply_handler),
        "garbled task": (105, "fedlora: cannot decode the task: task content:", train_handler(fake_train)),
        "vanished": (106, "lost: Flower error NODE_UNAVAILABLE (5): node went away",
                     train_handler(fake_train)),
        "twice": (107, "sent 2 replies to one task", train_handler(fake_train)),
    }
    clients = good[:1] + list(bad)[:4] + good[1:2] + list(bad)[4:] + good[2:]
    node_of = {**{cid: 200 + i for i, cid in enumerate(good)}, **{cid: n for cid, (n, _, _) in bad.items()}}
    handlers = {200 + i: train_handler(fake_train) for i in range(len(good))}
    handlers.update({n: h for n, _, h in bad.values()})
    gone = {106: lambda inbound, reply: Message(Error(ErrorCode.NODE_UNAVAILABLE, "node went\naway"),
                                                reply_to=inbound)}
    grid = FakeGrid(handlers, drop={102}, repeat={107}, garble_tasks={105}, replace=gone)
    tasks = {cid: make_task(i, cid) for i, cid in enumerate(clients)}
    called = []
    exchange = FlowerRuntime(grid, {cid: node_of[cid] for cid in clients}, timeout=5).exchange(
        tasks, on_reply=called.append)

    assert list(exchange.replies) == good and called == good
    for cid in good:
        assert_same(fake_train(tasks[cid]), exchange.replies[cid], f"reply[{cid!r}]")
    assert set(exchange.failed) == set(bad)
    for cid, (node, why, _) in bad.items():
        text = exchange.failed[cid]
        assert text.startswith(f"node {node} (client {cid!r}) "), text
        assert why in text, text
        assert "\n" not in text and len(text) < 500, text
    assert "RuntimeError" in exchange.failed["raises"] and "CUDA out of memory while training" in \
        exchange.failed["raises"]
    # every client's task went out and counts; a reply counts only where it decoded
    assert set(exchange.header_bytes) == set(clients)
    for cid in bad:
        assert exchange.header_bytes[cid] == content_header_bytes(task_to_content(tasks[cid]))


def test_a_client_without_a_node_fails_and_an_empty_exchange_sends_nothing():
    tasks, node_of, grid = healthy()
    del node_of[""]
    exchange = FlowerRuntime(grid, node_of).exchange(tasks)
    assert exchange.failed == {"": "client '' has no Flower node"}
    assert len(exchange.replies) == len(CLIENTS) - 1 and len(grid.sent) == len(CLIENTS) - 1
    empty = FlowerRuntime(grid, node_of).exchange({})
    assert (empty.replies, empty.failed, grid.timeouts) == ({}, {}, [None])  # no second send


def test_misuse_raises_one_line():
    tasks, node_of, grid = healthy()
    with pytest.raises(ValueError, match="share one"):
        FlowerRuntime(grid, {"a": 1, "b": 1})
    with pytest.raises(ValueError, match="node ids"):
        FlowerRuntime(grid, {"a": "1"})
    with pytest.raises(ValueError, match="timeout must be"):
        FlowerRuntime(grid, node_of, timeout=0)
    with pytest.raises(ValueError, match="addressed to client 'hospital-a'"):
        FlowerRuntime(grid, node_of).exchange({"0": tasks["hospital-a"]})


def test_train_handler_answers_an_undecodable_task_with_an_error_reply():
    handler = train_handler(fake_train)
    msg = Message(RecordDict({"junk": ConfigRecord({"x": 1})}), 5, "train", group_id="4")
    msg.metadata.__dict__["_message_id"] = "m-1"
    reply = handler(msg, Context(run_id=RUN_ID, node_id=5, node_config={}, state=RecordDict(), run_config={}))
    assert reply.has_error() and not reply.has_content()
    assert reply.error.code == ErrorCode.CLIENT_APP_RAISED_EXCEPTION
    assert reply.error.reason.startswith("fedlora: cannot decode the task: task content: ")
    assert "\n" not in reply.error.reason
    meta = reply.metadata
    assert (meta.reply_to_message_id, meta.src_node_id, meta.dst_node_id) == ("m-1", 5, 1)
    assert (meta.group_id, meta.message_type) == ("4", "train")
    # a task that decodes is trained; what train_fn raises reaches Flower's runner
    task_msg = Message(task_to_content(make_task(0, "x")), 5, "train")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        train_handler(raising_train)(task_msg, None)


# ---------------------------------------------------------------- bytes

def fedlora_bytes(content: RecordDict) -> int:
    """What fedlora puts in a content: the JSON header, each array's name and all of each array's data."""
    return len(content[HEADER_RECORD]["header"].encode()) + sum(
        len(name.encode()) + len(array.data) for name, array in content[TENSOR_RECORD].items())


def test_header_bytes_count_what_is_not_tensor_payload():
    tasks, node_of, grid = healthy()
    exchange = FlowerRuntime(grid, node_of).exchange(tasks)
    for msg, (cid, task) in zip(grid.sent, tasks.items()):
        reply = fake_train(task)
        payload = task_tensor_bytes(task) + reply_tensor_bytes(reply)
        fedlora = fedlora_bytes(msg.content) + fedlora_bytes(reply_to_content(reply))
        assert exchange.header_bytes[cid] == fedlora - payload
        assert exchange.header_bytes[cid] > len(msg.content[HEADER_RECORD]["header"])
        # Flower's own framing comes on top: its messages on the wire are larger still
        task_wire, reply_wire = grid.wire[node_of[cid]]
        assert exchange.header_bytes[cid] + payload < task_wire + reply_wire


# ---------------------------------------------------------------- node_ids_for

def test_node_ids_for_maps_sorted_nodes_to_clients_in_order():
    assert node_ids_for(["c", "a", "b"], [30, 10, 2**64 - 1, 20]) == {"c": 10, "a": 20, "b": 30}
    assert node_ids_for([], [5]) == {}
    assert node_ids_for(["x", "y"], iter([7, 7, 3])) == {"x": 3, "y": 7}
    with pytest.raises(ValueError, match=r"^3 clients need as many Flower nodes, the grid has 2$"):
        node_ids_for(["a", "b", "c"], [1, 2, 2])
    with pytest.raises(ValueError, match="distinct"):
        node_ids_for(["a", "a"], [1, 2])
