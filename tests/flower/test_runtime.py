"""FlowerRuntime and train_handler over a fake in-memory Grid: replies come back bit for bit, each task goes
to its node as a "train" message, every kind of client failure lands in ``Exchange.failed`` with one line
naming node and client while the other clients' replies come through, and the byte counts add up.

The fake Grid (``fake_grid.py``) does what Flower 1.41's grids and ClientApp runner do around a message.
The reference for a reply is what the fake ``train_fn`` returns for the task.
"""

from __future__ import annotations

import dataclasses

import pytest

pytest.importorskip("flwr")

from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict  # noqa: E402
from flwr.common.constant import ErrorCode  # noqa: E402

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
from message_builders import assert_same  # noqa: E402
from fake_grid import ROUND, RUN_ID, FakeGrid, fake_train, make_task  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread", "serverapp_process")

# ---------------------------------------------------------------- client handlers that misbehave

def raising_train(task: ClientTask) -> ClientReply:
    raise RuntimeError("CUDA out of memory\nwhile training")


def wrong_client_train(task: ClientTask) -> ClientReply:
    return dataclasses.replace(fake_train(task), client_id="someone-else")


def garbage_reply_handler(msg: Message, context: Context) -> Message:
    junk = RecordDict({HEADER_RECORD: ConfigRecord({"header": "{not json"}), TENSOR_RECORD: ArrayRecord()})
    return Message(junk, reply_to=msg)


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
