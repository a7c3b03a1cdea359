"""A fake in-memory Flower Grid for the runtime and node tests, and the fake training it routes to.

It does what Flower 1.41's grids and ClientApp runner do around a message: it gives each pushed message an
id, moves messages and replies through Flower's object store bytes (deflate each nested object, inflate from
the bytes), runs the node's handler, and turns an exception raised in it into an error reply. Messages can
only be built in a ServerApp's process: tests using it take the ``serverapp_process`` fixture (conftest).
"""

from __future__ import annotations

import dataclasses
import uuid

import torch
from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

from flower_builders import make_task as records_task
from fedlora.protocol import ClientReply, ClientTask
from fedlora.types import LoRAFactors

ROUND = 4
RUN_ID = 77  # the run of the fake ServerApp process (conftest) and of the contexts the Grid hands nodes


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
