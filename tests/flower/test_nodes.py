"""A node's side on Flower: the server's node query maps partitions to nodes and learns frozen versions; a
ClientNode folds catch-ups, skips one it already holds, restores its base weights for a catch-up from round
0, and refuses one that starts from a version it does not hold."""

from __future__ import annotations

import json
import types

import pytest

pytest.importorskip("flwr")

import torch  # noqa: E402
from flwr.app import Context, RecordDict  # noqa: E402

from engine_fixtures import tiny_overrides  # noqa: E402
from fedlora.flower.apps import answer_query  # noqa: E402
from fedlora.flower.node import _NODES, ClientNode, NodeStateError, config_key, node_for  # noqa: E402
from fedlora.flower.runtime import FlowerRuntime  # noqa: E402
from fedlora.types import LowRank  # noqa: E402
from fake_grid import RUN_ID, FakeGrid, fake_train, make_task  # noqa: E402

from fedlora.flower.runtime import train_handler  # noqa: E402

CONFIG = json.dumps({"seed": 3, "note": "the nodes only pass it on in these tests"})


class NodeGrid(FakeGrid):
    """FakeGrid whose nodes keep their node config and state across messages, as a SuperNode does."""

    def __init__(self, partitions: dict[int, object], **options):
        self.contexts = {n: Context(run_id=RUN_ID, node_id=n, node_config={"partition-id": p}, state=RecordDict(),
                                    run_config={}) for n, p in partitions.items()}
        self.queries = []

        def handler(node):
            def handle(msg, _context):
                if msg.metadata.message_type == "query":
                    self.queries.append(node)
                    return answer_query(msg, self.contexts[node])
                return train_handler(fake_train)(msg, self.contexts[node])
            return handle

        super().__init__({n: handler(n) for n in partitions}, **options)


def test_the_node_query_maps_each_partition_to_its_node_and_reports_versions(serverapp_process):
    grid = NodeGrid({70: 2, 71: 0, 72: 1, 73: "not a number"})
    runtime = FlowerRuntime(grid, {})
    missing = runtime.connect(["a", "b", "c", "d"], CONFIG, wait_s=0.1, poll_s=0.01)
    assert runtime.nodes == {"a": 71, "b": 72, "c": 70}
    assert missing == ["d"]
    assert sorted(grid.queries) == [70, 71, 72, 73]
    for node in (70, 71, 72):  # the run's config is kept in the node's state for its tasks
        assert grid.contexts[node].state["fedlora.node"]["config"] == CONFIG
    assert runtime.client_versions(["a"]) == {"a": 0, "b": 0, "c": 0}  # what the query reported, once
    grid.queries.clear()
    assert runtime.client_versions(["a", "b"]) == {}
    assert grid.queries == []  # known clients whose last task did not fail are not asked again


def test_a_client_whose_task_failed_is_asked_for_its_version_again(serverapp_process):
    grid = NodeGrid({70: 0, 71: 1}, drop={71})
    runtime = FlowerRuntime(grid, {})
    runtime.connect(["a", "b"], CONFIG, wait_s=0.1, poll_s=0.01)
    runtime.client_versions(["a", "b"])
    exchange = runtime.exchange({"a": make_task(0, "a"), "b": make_task(1, "b")})
    assert set(exchange.failed) == {"b"} and set(exchange.replies) == {"a"}
    grid.queries.clear()
    grid.drop.clear()
    assert runtime.client_versions(["a", "b"]) == {"b": 0}
    assert grid.queries == [71]


# ---------------------------------------------------------------- the node's frozen weights

@pytest.fixture(scope="module")
def node(assets, tmp_path_factory):
    from fedlora.config import load_config

    model, tsv = assets
    cfg = load_config(None, tiny_overrides(model, tsv, tmp_path_factory.mktemp("node"), "fedex", 2))
    config_json = json.dumps(cfg.to_dict(), sort_keys=True)
    assert (config_key(config_json), 1) not in _NODES  # built on first use
    built = node_for(config_json, 1)
    assert node_for(config_json, 1) is built and built.client_id == "1"
    return built


def _catch_up(start: int, end: int, terms: dict[str, LowRank]):
    return types.SimpleNamespace(catch_up_from=start, catch_up_to=end, catch_up=terms)


def test_a_node_folds_catch_ups_restores_its_base_and_refuses_a_version_it_lacks(node: ClientNode):
    layers = node.host.layers
    name = next(iter(layers))
    weight = layers[name].get_base_layer().weight
    base = weight.detach().to(torch.float64).clone()
    gen = torch.Generator().manual_seed(0)
    d_out, d_in = weight.shape

    def term(rank):
        return LowRank(torch.randn(d_out, rank, generator=gen), torch.randn(rank, d_in, generator=gen))

    first, second = term(2), term(3)
    node.catch_up(_catch_up(0, 1, {name: first}))
    assert node.version == 1
    want = base + first.left.double() @ first.right.double()
    assert torch.allclose(weight.double(), want, atol=1e-5)

    node.catch_up(_catch_up(0, 1, {name: first}))  # a resent task: already there, nothing folded twice
    assert torch.allclose(weight.double(), want, atol=1e-5)

    with pytest.raises(NodeStateError, match="holds frozen weights of round 1; the task catches up from round 3"):
        node.catch_up(_catch_up(3, 5, {name: second}))
    assert node.version == 1

    node.catch_up(_catch_up(0, 4, {name: second}))  # from the base: the earlier fold is undone first
    assert node.version == 4
    assert torch.allclose(weight.double(), base + second.left.double() @ second.right.double(), atol=1e-5)
    node.catch_up(_catch_up(0, 0, {}))
    assert node.version == 0 and torch.equal(weight.double(), base)  # bit for bit


def test_a_node_refuses_a_partition_outside_the_run(node):
    from fedlora.flower.node import _SHARED

    shared = next(iter(_SHARED.values()))
    with pytest.raises(ValueError, match="partition-id=9 is outside the run's 4 partitions"):
        ClientNode(types.SimpleNamespace(lora=None, model=None), 9, shared)


def test_the_frozen_state_survives_a_fresh_process_through_its_bytes(node: ClientNode):
    """What a deployed SuperNode does between messages: save to context.state, rebuild in a new process."""
    layers = node.host.layers
    names = list(layers)[:2]
    gen = torch.Generator().manual_seed(1)
    terms = {m: LowRank(torch.randn(layers[m].get_base_layer().weight.shape[0], 2, generator=gen),
                        torch.randn(2, layers[m].get_base_layer().weight.shape[1], generator=gen)) for m in names}
    node.catch_up(_catch_up(0, 0, {}))
    node.catch_up(_catch_up(0, 3, terms))
    more = {names[0]: LowRank(torch.randn(terms[names[0]].left.shape[0], 1, generator=gen),
                              torch.randn(1, terms[names[0]].right.shape[1], generator=gen))}
    node.catch_up(_catch_up(3, 5, more))
    want = {m: layers[m].get_base_layer().weight.detach().clone() for m in names}
    saved, version = node.save_frozen(), node.version

    node.catch_up(_catch_up(0, 0, {}))  # as a new process starts: base weights, version 0
    node.restore_frozen(saved, version)
    assert node.version == 5
    for m in names:
        assert torch.allclose(layers[m].get_base_layer().weight, want[m], atol=1e-6)
    assert node.frozen[names[0]].rank == 3 and node.frozen[names[1]].rank == 2  # both catch-ups, exactly
    node.restore_frozen(b"", 0)
    assert node.version == 0 and node.frozen == {}
