"""Client-level DP at the server (``fedlora.privacy.client_level``), against dense float64 references.

The release with no noise and no clipping is FRA-with-fold of the uniform mean (dense, and the aggregator
itself); each clipped update, head included, is within C; the noise has the stated standard deviation and
comes from its own stream; the reported epsilon is Opacus's; the engine samples by Poisson sampling, records
client epsilon, and replays exactly on resume.
"""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.privacy import ClientDP, release
from fedlora.types import LoRAFactors

pytest.importorskip("opacus")

SCALE = 2.0


def _federation(seed: int, clients: int = 4, modules=(("q", 12, 10), ("v", 9, 12)), rank: int = 3, big: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    start = {m: LoRAFactors(torch.randn(o, rank, generator=g, dtype=torch.float64) * 0.3,
                            torch.randn(rank, i, generator=g, dtype=torch.float64) * 0.3, SCALE) for m, o, i in modules}
    head = {"w": torch.randn(2, 5, generator=g, dtype=torch.float64), "b": torch.zeros(2, dtype=torch.float64)}
    trained = {}
    for k in range(clients):
        size = big if k == 0 else 1.0
        factors = {m: LoRAFactors(f.B + size * 0.2 * torch.randn(f.B.shape, generator=g, dtype=torch.float64),
                                  f.A + size * 0.2 * torch.randn(f.A.shape, generator=g, dtype=torch.float64), SCALE)
                   for m, f in start.items()}
        trained[f"c{k}"] = (factors, {n: h + size * 0.1 * torch.randn(h.shape, generator=g, dtype=torch.float64)
                                      for n, h in head.items()})
    return start, head, trained


def _dense(f: LoRAFactors) -> torch.Tensor:
    return f.scale * f.B @ f.A


def _released_dense(out, m: str) -> torch.Tensor:
    return _dense(out.factors[m]) + out.tails[m].left @ out.tails[m].right


def _update_norm_sq(start, head, factors, client_head) -> float:
    total = sum(float((_dense(factors[m]) - _dense(start[m])).square().sum()) for m in start)
    return total + sum(float((client_head[n] - head[n]).square().sum()) for n in head)


def test_no_noise_no_clip_is_fra_fold_of_the_uniform_mean_exactly():
    from fedlora.aggregators import get_aggregator
    from fedlora.types import ClientUpdate, ModuleState

    start, head, trained = _federation(0)
    dp = ClientDP(noise_multiplier=0.0, clip=math.inf, sample_rate=1.0, num_clients=len(trained), delta=1e-3)
    out = release(dp, start, head, trained, noise_seed=7)
    fra = get_aggregator("fra", fold_tail=True).aggregate(
        {m: ModuleState(f) for m, f in start.items()},
        [ClientUpdate(cid, factors, num_examples=10 + i, weight=1.0)
         for i, (cid, (factors, _)) in enumerate(trained.items())],
        0)
    for m in start:
        reference = sum(_dense(factors[m]) for factors, _ in trained.values()) / len(trained)  # dense float64
        assert torch.allclose(_released_dense(out, m), reference, atol=1e-12, rtol=0)
        by_fra = _dense(fra.global_state[m].factors) + fra.corrections[m].left @ fra.corrections[m].right
        assert torch.allclose(_released_dense(out, m), by_fra, atol=1e-12, rtol=0)
        assert out.factors[m].rank == start[m].rank
    for n in head:
        assert torch.allclose(out.head[n], sum(h[n] for _, h in trained.values()) / len(trained), atol=1e-14)
    assert out.error < 1e-13 and not out.clipped


@pytest.mark.parametrize("seed", range(6))
def test_each_clipped_update_head_included_is_within_the_bound_and_the_release_moves_at_most_c_over_m(seed):
    start, head, trained = _federation(seed, big=1000.0)
    clip = 0.5
    dp = ClientDP(noise_multiplier=0.0, clip=clip, sample_rate=0.5, num_clients=2 * len(trained), delta=1e-3)
    out = release(dp, start, head, trained, noise_seed=1)
    assert "c0" in out.clipped and out.clipped["c0"] ** 2 == pytest.approx(
        _update_norm_sq(start, head, *trained["c0"]), rel=1e-9)
    # leaving out any one client moves the released update by at most C / m (dense float64)
    for leave in trained:
        rest = {c: v for c, v in trained.items() if c != leave}
        other = release(dp, start, head, rest, noise_seed=1)
        moved = sum(float((_released_dense(out, m) - _released_dense(other, m)).square().sum()) for m in start)
        moved += sum(float((out.head[n] - other.head[n]).square().sum()) for n in head)
        assert math.sqrt(moved) <= clip / dp.expected_clients * (1 + 1e-9)


def test_noise_has_the_stated_std_and_comes_from_its_seed():
    start, head, trained = _federation(1, modules=(("q", 64, 80),))
    dp = ClientDP(noise_multiplier=1.3, clip=0.7, sample_rate=0.5, num_clients=8, delta=1e-3)
    quiet = release(ClientDP(0.0, 0.7, 0.5, 8, 1e-3), start, head, trained, noise_seed=3)
    noisy = release(dp, start, head, trained, noise_seed=3)
    noise = _released_dense(noisy, "q") - _released_dense(quiet, "q")
    assert dp.noise_std == pytest.approx(1.3 * 0.7 / 4)
    assert float(noise.std()) == pytest.approx(dp.noise_std, rel=0.05)  # 5120 draws: 1 % standard error
    assert abs(float(noise.mean())) < 4 * dp.noise_std / math.sqrt(noise.numel())
    again = release(dp, start, head, trained, noise_seed=3)
    assert torch.equal(_released_dense(again, "q"), _released_dense(noisy, "q"))
    other = release(dp, start, head, trained, noise_seed=4)
    assert not torch.allclose(_released_dense(other, "q"), _released_dense(noisy, "q"))


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_epsilon_is_opacus_and_the_target_noise_spends_the_budget(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    dp = ClientDP.for_target(2.0, 20, clip=1.0, sample_rate=0.3, num_clients=50, delta=1e-3, accountant=accountant)
    acc = RDPAccountant() if accountant == "rdp" else PRVAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=dp.noise_multiplier, sample_rate=0.3)
    assert dp.epsilon(20) == pytest.approx(acc.get_epsilon(delta=1e-3), rel=1e-6)
    assert dp.epsilon(20) <= 2.0 * 1.0001
    assert dp.epsilon(20) == pytest.approx(2.0, rel=0.02)
    assert ClientDP(0.9 * dp.noise_multiplier, 1.0, 0.3, 50, 1e-3, accountant).epsilon(20) > 2.0
    assert ClientDP(0.0, 1.0, 0.3, 50, 1e-3).epsilon(1) == math.inf


# --------------------------------------------------------------------------- the engine
def _cfg(assets, out, *extra, method="fra"):
    from engine_fixtures import tiny_overrides

    from fedlora.config import load_config

    model, tsv = assets
    fold = ["federation.method_options.fold_tail=true"] if method == "fra" else []
    return load_config(None, [*tiny_overrides(model, tsv, out, method, 3), *fold, *extra])


def test_engine_poisson_samples_records_client_epsilon_and_resumes_exactly(assets, tmp_path):
    from opacus.accountants import RDPAccountant

    from fedlora.sim.engine import Simulation

    extra = ["privacy.client_epsilon=4", "privacy.client_clip=0.5", "federation.clients_per_round=2"]
    sim = Simulation(_cfg(assets, tmp_path / "full", *extra))
    records = sim.run()
    dp = sim.client_dp
    assert dp.sample_rate == 0.5 and dp.delta == pytest.approx(1 / 40)
    counts = {len(r["clients"]) + len(r["rejected"]) for r in records}
    acc = RDPAccountant()
    for r in records:
        acc.step(noise_multiplier=dp.noise_multiplier, sample_rate=0.5)
        assert r["client_epsilon"] == pytest.approx(acc.get_epsilon(delta=dp.delta), rel=1e-9)
        assert r["client_delta"] == dp.delta
    assert records[-1]["client_epsilon"] <= 4.0 * 1.0001
    assert counts <= {0, 1, 2, 3, 4}

    # a run calibrated to a target epsilon cannot be extended (its noise would overspend)
    with pytest.raises(ValueError, match="cannot be extended"):
        Simulation.resume(tmp_path / "full", rounds=4)
    # with a fixed noise multiplier it can: a run stopped after round 2 and resumed draws the same noise
    fixed = ["privacy.client_noise_multiplier=1.0", "privacy.client_clip=0.5", "federation.clients_per_round=2"]
    whole = Simulation(_cfg(assets, tmp_path / "whole", *fixed)).run()
    Simulation(_cfg(assets, tmp_path / "part", *fixed, "federation.rounds=2")).run()
    resumed = Simulation.resume(tmp_path / "part", rounds=3).run()
    assert len(resumed) == 3
    for a, b in zip(whole, resumed):
        assert a["metric"] == b["metric"] and a["eval_loss"] == b["eval_loss"] and a["clients"] == b["clients"]
        assert a["client_epsilon"] == b["client_epsilon"]


def test_poisson_client_sampling_has_the_binomial_mean_and_spread():
    import numpy as np

    from fedlora.sim.dp import poisson_clients

    ids = [f"c{i}" for i in range(10)]
    rng = np.random.default_rng(0)
    sizes = np.array([len(poisson_clients(ids, 0.3, rng)) for _ in range(4000)])
    assert sizes.mean() == pytest.approx(3.0, abs=0.1)  # standard error 0.023
    assert sizes.var() == pytest.approx(10 * 0.3 * 0.7, rel=0.1)
    assert (sizes == 0).mean() == pytest.approx(0.7**10, abs=0.01)


@pytest.mark.parametrize("method, extra, fragment", [
    ("fedex", ["privacy.client_epsilon=3"], "only fra with fold_tail=true"),
    ("fra", ["federation.method_options.fold_tail=false", "privacy.client_epsilon=3"], "only fra with fold_tail"),
    ("fra", ["federation.method_options.ffa_after=1", "privacy.client_epsilon=3"], "only fra with fold_tail"),
    ("fra", ["privacy.client_epsilon=3", "privacy.client_noise_multiplier=1"], "not both"),
    ("fra", ["privacy.client_epsilon=3", "privacy.client_delta=0.25"], "below 1/n"),
])
def test_what_client_level_dp_cannot_cover_is_refused_in_one_line(assets, tmp_path, method, extra, fragment):
    from fedlora.sim.engine import Simulation

    with pytest.raises(ValueError) as err:
        Simulation.check(_cfg(assets, tmp_path / "x", *extra, method=method))
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_the_summary_table_shows_the_client_epsilon():
    from rich.console import Console

    from fedlora.report import summary_table

    records = [{"round": 1, "metric_name": "accuracy", "metric": 0.5, "client_epsilon": 0.812, "client_delta": 0.01},
               {"round": 2, "metric_name": "accuracy", "metric": 0.6, "client_epsilon": 1.25, "client_delta": 0.01}]
    console = Console(width=200, record=True)
    console.print(summary_table(records))
    text = console.export_text()
    assert "client eps (delta 1.0e-02)" in text and "0.812" in text and "1.250" in text
