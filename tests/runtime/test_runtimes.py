"""The round protocol across runtimes: serialised messages, catch-up of skipped rounds, partial depth.

References: the in-process runtime's own records (the serialising stand-in must match them exactly), the
messages' measured sizes, a dense float64 server weight folded round by round, and autograd hooks.
"""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import TIMING_KEYS, tiny_overrides
from fedlora.aggregators import get_aggregator
from fedlora.config import load_config
from fedlora.protocol import ClientReply, TrainSettings, message_sizes
from fedlora.protocol.strategy import RoundStrategy
from fedlora.types import LoRAFactors, ModuleState



def _cfg(assets, out, method="hexa", rounds=2, extra=()):
    return load_config(None, [*tiny_overrides(*assets, out, method, rounds), *extra])


@pytest.mark.parametrize("method", ["hexa", "ffa"])
def test_serialised_messages_give_the_same_run_and_their_tensor_bytes_are_the_counted_bytes(
        assets, tmp_path, monkeypatch, method):
    from fedlora.sim import runtimes
    from fedlora.sim.engine import Simulation

    plain = Simulation(_cfg(assets, tmp_path / "plain", method)).run()
    sizes = {}  # (round, client, "task" | "reply") -> message_sizes
    for kind, name in (("task", "encode_task"), ("reply", "encode_reply")):
        real = getattr(runtimes, name)

        def spy(msg, real=real, kind=kind):
            data = real(msg)
            sizes[(msg.round + 1, msg.client_id, kind)] = message_sizes(data)
            return data

        monkeypatch.setattr(runtimes, name, spy)
    wire_sim = Simulation(_cfg(assets, tmp_path / "wire", method), runtime=runtimes.SerializingRuntime)
    wire = wire_sim.run()

    def strip(records):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS | {"header_bytes", "wire_tensor_bytes"}}
                for r in records]

    assert strip(wire) == strip(plain)
    for record in wire:
        n = record["round"]
        assert record["wire_tensor_bytes"] == sum(s["tensor_bytes"] for (r, _, _), s in sizes.items() if r == n)
        assert record["wire_tensor_bytes"] == record["bytes_up"] + record["bytes_down"]
        for cid in record["clients"]:
            assert record["bytes_down_per_client"][cid] == sizes[(n, cid, "task")]["tensor_bytes"]
            assert record["bytes_up_per_client"][cid] == sizes[(n, cid, "reply")]["tensor_bytes"]
        headers = sum(s["header_bytes"] for (r, _, _), s in sizes.items() if r == n)
        assert record["header_bytes"] == headers > 0
    if method == "ffa":  # A is frozen: in round 1 (no catch-up yet) the reply lacks A, adds the histogram
        a_bytes = sum(s.factors.A.numel() * s.factors.A.element_size() for s in wire_sim.global_state.values())
        histogram_bytes = 2 * 8  # two labels, float64
        first = wire[0]
        for cid in first["clients"]:
            assert first["bytes_down_per_client"][cid] - first["bytes_up_per_client"][cid] == a_bytes - histogram_bytes


def _random_state(d_out, d_in, r, modules, gen):
    return {m: ModuleState(LoRAFactors(torch.randn(d_out, r, generator=gen, dtype=torch.float64) * 0.1,
                                       torch.randn(r, d_in, generator=gen, dtype=torch.float64) * 0.1, 2.0))
            for m in modules}


@pytest.mark.parametrize("method", ["fedex", "hexa"])
def test_a_client_that_skipped_rounds_catches_up_to_the_servers_frozen_weights(method):
    gen = torch.Generator().manual_seed(3)
    d_out, d_in, r, modules = 12, 10, 2, ["q", "v"]
    state = _random_state(d_out, d_in, r, modules, gen)
    clients = ["a", "b", "c", "hospital-d"]
    strategy = RoundStrategy(get_aggregator(method), state, {}, train=TrainSettings(),
                             ranks={c: r for c in clients}, seed=0)
    W0 = {m: torch.randn(d_out, d_in, generator=gen, dtype=torch.float64) for m in modules}
    server = {m: w.clone() for m, w in W0.items()}
    remote = {m: w.clone() for m, w in W0.items()}  # hospital-d's own frozen weights
    for t in range(6):
        sampled = ["a", "b", "hospital-d"] if t in (0, 5) else ["a", "b", "c"]  # d skips rounds 2..5 (t = 1..4)
        tasks = strategy.configure_train(t, sampled)
        if "hospital-d" in tasks:
            task = tasks["hospital-d"]
            assert (task.catch_up_from, task.catch_up_to) == (0, t)  # its weights are still at round 0
            for m, c in task.catch_up.items():
                assert c.rank <= 4 * (len(sampled) - 1) * r  # factors, never d_out x d_in
                remote[m] += c.left @ c.right
            for m in modules:
                torch.testing.assert_close(remote[m], server[m], rtol=0, atol=1e-12)
        replies = {
            cid: ClientReply(round=t, client_id=cid, rank=r, num_examples=10 + i, train_loss=0.0, factors={
                m: LoRAFactors(f.B + 0.05 * torch.randn(f.B.shape, generator=gen, dtype=torch.float64),
                               f.A + 0.05 * torch.randn(f.A.shape, generator=gen, dtype=torch.float64), f.scale)
                for m, f in task.adapter.items()})
            for i, (cid, task) in enumerate(tasks.items())
        }
        result = strategy.aggregate_train(t, tasks, replies)
        assert result.error < 1e-9 and not result.rejected
        assert set(result.corrections) == set(modules)
        for m, c in result.corrections.items():
            server[m] += c.left @ c.right
    assert strategy.synced["hospital-d"] == 5 and strategy.synced["c"] == 4


def test_a_task_that_trains_only_the_top_layer_runs_no_backward_below_it(assets, tmp_path, monkeypatch):
    from fedlora.sim import runtimes
    from fedlora.sim.engine import Simulation

    sim = Simulation(_cfg(assets, tmp_path / "run", "fedit", rounds=1))
    top = [m for m in sim.global_state if ".layer.1." in m]
    bottom = [m for m in sim.global_state if m not in top]
    assert top and bottom
    shallow = sim.sample_clients(0)[0]
    sim.strategy.modules_for = lambda cid, t: top if cid == shallow else None

    lower_layer = sim.model.base_model.model.bert.encoder.layer[0]
    seen = {}
    real = runtimes.train_client

    def watched(host, task, data):
        calls = []
        hook = lower_layer.register_full_backward_hook(lambda *a: calls.append(1))
        try:
            reply = real(host, task, data)
        finally:
            hook.remove()
        after = host.read_state(host.adapter_for(task.rank))
        seen[task.client_id] = (task, reply, len(calls), after)
        return reply

    monkeypatch.setattr(runtimes, "train_client", watched)
    record = sim.run_round(0)

    task, reply, backward_calls, after = seen[shallow]
    assert backward_calls == 0 and sorted(reply.factors) == sorted(top)
    for m in bottom:  # untouched, bit for bit
        assert torch.equal(after[m].factors.B, task.adapter[m].B) and torch.equal(after[m].factors.A, task.adapter[m].A)
    deep = [c for c in seen if c != shallow]
    assert all(seen[c][2] > 0 and sorted(seen[c][1].factors) == sorted(sim.global_state) for c in deep)

    # each module is averaged over the clients that trained it (FedIT: p_k = n_k / sum n over those)
    for modules, group in ((bottom, deep), (top, [shallow, *deep])):
        n = {c: seen[c][1].num_examples for c in group}
        for m in modules:
            want_b = sum(n[c] / sum(n.values()) * seen[c][1].factors[m].B for c in group)
            torch.testing.assert_close(sim.global_state[m].factors.B, want_b, rtol=1e-6, atol=1e-7)
    assert record["clients"] == sim.sample_clients(0)
