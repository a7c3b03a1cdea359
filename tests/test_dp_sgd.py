"""Sample-level DP-SGD on the tiny model: the reported epsilon is Opacus's for the steps each client took, the
noisy path with no noise and no clipping is plain training, and what DP-SGD cannot cover is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine_fixtures import tiny_overrides

pytest.importorskip("opacus")


def _cfg(assets, out, *extra):
    from fedlora.config import load_config

    model, tsv = assets
    return load_config(None, [*tiny_overrides(model, tsv, out, "fedex", 3), *extra])


def test_each_clients_epsilon_is_opacus_for_the_steps_it_took(assets, tmp_path):
    from opacus.accountants import RDPAccountant

    from fedlora.sim.engine import Simulation

    sim = Simulation(_cfg(assets, tmp_path / "dp", "privacy.target_epsilon=3", "privacy.clip=0.5"))
    records = sim.run()
    delta = records[-1]["dp_delta"]
    sizes = {cid: len(d.indices) for cid, d in sim.clients.items()}
    assert delta == pytest.approx(1 / (10 * min(sizes.values())))
    sampled: dict[str, int] = {}
    for record in records:
        for cid in record["clients"] + record["rejected"]:
            sampled[cid] = sampled.get(cid, 0) + 1
        for cid, eps in record["epsilon"].items():
            settings = sim.ledger.settings[cid]
            acc = RDPAccountant()
            for _ in range(sampled[cid] * 3):  # 3 local steps per round it was sampled in
                acc.step(noise_multiplier=settings["noise_multiplier"], sample_rate=settings["sample_rate"])
            assert eps == pytest.approx(acc.get_epsilon(delta=delta), rel=1e-9)
            assert settings["sample_rate"] == pytest.approx(8 / sizes[cid])
        assert record["epsilon_max"] <= 3.0 * 1.0001
    # a client sampled in every round spends (within Opacus's search tolerance) the whole budget
    full = [cid for cid, n in sampled.items() if n == 3]
    for cid in full:
        assert records[-1]["epsilon"][cid] == pytest.approx(3.0, rel=0.02)


def test_no_noise_and_no_clipping_is_plain_training(assets, tmp_path):
    """The DP-SGD step with sigma 0 and a clip no gradient reaches, on the same batches, is AdamW on the mean
    gradient (per-example gradients summed in another order: equal to float32 rounding)."""
    from fedlora import adapters
    from fedlora.sim.client import batch_at, local_batches, train_local
    from fedlora.sim.dp import train_local_dp

    cfg = _cfg(assets, tmp_path / "x")
    results = []
    for dp in (False, True):
        base, tok = adapters.load_base_model(cfg.model, 2, 0)
        model = adapters.attach_lora(base, cfg.lora, cfg.model.task_type)
        enc = dict(tok(["good fun film", "dull plot", "warm and bright", "sad cold ending"] * 4, padding=True,
                       return_tensors="pt"))
        enc["labels"] = torch.tensor([1, 0, 1, 0] * 4)
        params = [p for p in model.parameters() if p.requires_grad]
        batches = local_batches(np.arange(16), 8, 4, [0, 1])
        if dp:
            train_local_dp(model, params, batches, enc, lr=0.01, weight_decay=0.0, warmup_steps=0,
                           noise_multiplier=0.0, clip=1e9, expected_batch_size=8, seed=[0, 0, 0], batch_at=batch_at)
        else:
            train_local(model, params, batches, enc, steps=4, lr=0.01, weight_decay=0.0, warmup_steps=0,
                        max_grad_norm=None)
        results.append([p.detach().clone() for p in params])
        assert not any(hasattr(p, "grad_sample") for p in params)
        assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # Opacus's hooks are gone
    for plain, private in zip(*results):
        torch.testing.assert_close(private, plain, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("extra, fragment", [
    (["privacy.target_epsilon=3", "privacy.delta=0.5"], "privacy.delta=0.5"),
    (["privacy.target_epsilon=3", "federation.method=hexa", "federation.method_options.proximal_mu=0.1"],
     "proximal"),
])
def test_what_dp_sgd_cannot_cover_is_refused_in_one_line(assets, tmp_path, extra, fragment):
    from fedlora.sim.engine import Simulation

    with pytest.raises(ValueError) as info:
        Simulation(_cfg(assets, tmp_path / "bad", *extra))
    assert fragment in str(info.value) and "\n" not in str(info.value)


def test_dp_settings_travel_in_the_task_so_a_serialising_runtime_gives_the_same_run(assets, tmp_path):
    from fedlora.sim.engine import Simulation
    from fedlora.sim.runtimes import SerializingRuntime

    extra = ("privacy.target_epsilon=8", "federation.rounds=2")
    plain = Simulation(_cfg(assets, tmp_path / "a", *extra)).run()
    wire = Simulation(_cfg(assets, tmp_path / "b", *extra), runtime=SerializingRuntime).run()
    for a, b in zip(plain, wire):
        for key in ("metric", "eval_loss", "train_loss", "agg_error", "epsilon", "clients"):
            assert a[key] == b[key], key


def test_the_summary_table_shows_the_epsilon_spent():
    from rich.console import Console

    from fedlora.report import summary_table

    records = [{"round": 1, "metric_name": "accuracy", "metric": 0.5, "epsilon_max": 1.234, "dp_delta": 1e-4},
               {"round": 2, "metric_name": "accuracy", "metric": 0.6, "epsilon_max": 2.5, "dp_delta": 1e-4}]
    console = Console(width=200, record=True)
    console.print(summary_table(records))
    text = console.export_text()
    assert "eps max (delta 1.0e-04)" in text and "1.234" in text and "2.500" in text
