"""Waits for `nodes` nodes, sends each one query, writes which nodes answered (and with what) to `result`."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


@server.main()
def main(grid: Grid, context: Context) -> None:
    want = int(context.run_config["nodes"])
    deadline = time.monotonic() + 60
    while len(list(grid.get_node_ids())) < want and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(3)  # a node that should be refused gets the time to try
    nodes = sorted(grid.get_node_ids())
    msgs = [Message(RecordDict({"q": ConfigRecord({"x": 1})}), n, MessageType.QUERY) for n in nodes]
    answers = {m.metadata.src_node_id: m.content["a"]["partition"] for m in grid.send_and_receive(msgs, timeout=60)
               if m.has_content()}
    with open(str(context.run_config["result"]), "w") as f:
        json.dump({"nodes": nodes, "answers": {str(k): v for k, v in answers.items()}}, f)


@client.query()
def query(msg: Message, context: Context) -> Message:
    return Message(RecordDict({"a": ConfigRecord({"partition": int(context.node_config["partition-id"])})}),
                   reply_to=msg)
