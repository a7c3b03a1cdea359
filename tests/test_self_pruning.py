"""HetLoRA's local rank self-pruning: the penalty and the pruning rule by hand, then a client that prunes.

References: hand-computed norms and shares; a federation whose adapter has two ranks of known tiny norm.
"""

from __future__ import annotations

import pytest
import torch

from engine_fixtures import tiny_overrides
from fedlora import lowrank
from fedlora.config import load_config
from fedlora.types import LoRAFactors, ModuleState


def test_tail_penalty_is_the_sum_of_the_last_ranks_norm_products():
    B = torch.tensor([[1.0, 0.0, 3.0], [0.0, 2.0, 4.0]])  # column norms 1, 2, 5
    A = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])  # row norms 2, 1, 5
    assert float(lowrank.tail_penalty(B, A, 2)) == pytest.approx(2 * 1 + 5 * 5)
    assert float(lowrank.tail_penalty(B, A, 0)) == 0.0
    B.requires_grad_(True)
    lowrank.tail_penalty(B, A, 1).backward()  # d/dB[:, 2] of ||b_3|| ||a_3|| = a-norm * b / ||b||
    torch.testing.assert_close(B.grad[:, 2], 5 * torch.tensor([3.0, 4.0]) / 5)
    assert float(B.grad[:, :2].abs().sum()) == 0.0


def test_pruned_rank_drops_trailing_ranks_below_the_share_in_every_module():
    # orthogonal ranks: ||BA||_F = sqrt(sum of squared rank norms) -> shares are exact
    B = torch.diag(torch.tensor([10.0, 5.0, 0.1, 0.05]))
    A = torch.eye(4)
    total = (100 + 25 + 0.01 + 0.0025) ** 0.5
    assert 0.1 / total < 0.01 < 5 / total
    assert lowrank.pruned_rank([(B, A)], threshold=0.01) == 2
    assert lowrank.pruned_rank([(B, A)], threshold=0.01, floor=3) == 3
    # a middle rank below the threshold stays: only a trailing run is pruned
    B_mid = torch.diag(torch.tensor([10.0, 0.01, 5.0, 0.01]))
    assert lowrank.pruned_rank([(B_mid, A)], threshold=0.01) == 3
    # a rank kept by one module is kept for the client
    B_other = torch.diag(torch.tensor([1.0, 1.0, 1.0, 0.01]))
    assert lowrank.pruned_rank([(B, A), (B_other, A)], threshold=0.01) == 3


def test_a_hetlora_client_prunes_tiny_ranks_and_trains_the_smaller_rank_next_round(assets, tmp_path):
    from fedlora.sim.engine import Simulation

    overrides = [*tiny_overrides(*assets, tmp_path / "run", "hetlora", rounds=2),
                 "federation.method_options.prune_threshold=0.02", "train.lr=1e-7", "train.local_steps=1"]
    sim = Simulation(load_config(None, overrides))
    gen = torch.Generator().manual_seed(0)
    for m, s in sim.strategy.global_state.items():  # ranks 3 and 4 carry ~1e-4 of the update
        f = s.factors
        B = torch.randn(f.B.shape, generator=gen) * torch.tensor([1.0, 1.0, 1e-4, 1e-4])
        sim.strategy.global_state[m] = ModuleState(LoRAFactors(B, torch.randn(f.A.shape, generator=gen), f.scale),
                                                   s.layout)
    first = sim.run_round(0)
    assert set(first["client_ranks"].values()) == {4}
    clients = first["clients"]
    assert all(sim.strategy.ranks[c] == 2 for c in clients)
    second = sim.run_round(1)
    for c in second["clients"]:
        assert second["client_ranks"][c] == (2 if c in clients else 4)
