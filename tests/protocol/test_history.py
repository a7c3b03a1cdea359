"""Correction history: ``since(t)`` against the dense float64 sum of rounds ``t+1..latest``.

Every reference is formed densely from the corrections that went in (``left @ right`` summed in
float64); nothing here calls ``fedlora.lowrank`` to produce an expectation.
"""

from __future__ import annotations

import pytest
import torch

from fedlora.protocol import CorrectionHistory
from fedlora.types import LowRank

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SHAPES = {"q": (7, 5), "v": (4, 9), "o": (6, 6), "tall": (3, 40)}
ROUNDS = 6


def make_rounds(seed: int, dtype=torch.float64) -> list[dict[str, LowRank]]:
    """Six rounds of random corrections: random module subsets, ranks 0..3, round 3 empty."""
    gen = torch.Generator().manual_seed(seed)
    rounds = []
    for r in range(1, ROUNDS + 1):
        corrections = {}
        for m, (d_out, d_in) in SHAPES.items():
            if r == 3 or torch.rand(1, generator=gen).item() < 0.25:
                continue
            k = int(torch.randint(0, 4, (1,), generator=gen))
            left = torch.randn(d_out, k, generator=gen, dtype=torch.float64)
            right = torch.randn(k, d_in, generator=gen, dtype=torch.float64)
            corrections[m] = LowRank(left.to(dtype), right.to(dtype))
        rounds.append(corrections)
    return rounds


def dense_sum(rounds: list[dict[str, LowRank]], version: int) -> dict[str, torch.Tensor]:
    """``{module: sum of left @ right over rounds version+1..}`` in float64, modules of nonzero rank only."""
    out: dict[str, torch.Tensor] = {}
    for corrections in rounds[version:]:
        for m, c in corrections.items():
            if c.rank:
                out[m] = out.get(m, 0) + c.left.double() @ c.right.double()
    return out


def filled(rounds, **kwargs) -> CorrectionHistory:
    h = CorrectionHistory(**kwargs)
    for r, corrections in enumerate(rounds, start=1):
        h.append(r, corrections)
    return h


@pytest.mark.parametrize("seed", range(5))
def test_since_is_the_exact_sum(seed):
    rounds = make_rounds(seed)
    h = filled(rounds)
    assert h.latest == ROUNDS
    for version in range(ROUNDS + 1):
        got, expected = h.since(version), dense_sum(rounds, version)
        assert set(got) == set(expected), version
        for m, ref in expected.items():
            err = torch.linalg.matrix_norm(got[m].dense() - ref)
            assert err <= 1e-10 * torch.linalg.matrix_norm(ref), (version, m, float(err))
            ranks = sum(c[m].rank for c in rounds[version:] if m in c)
            assert got[m].rank <= min(ranks, *SHAPES[m])
            assert got[m].dense().dtype == torch.float64
    assert h.since(ROUNDS) == {}


def test_float32_keeps_dtype_and_is_close():
    rounds = make_rounds(7, torch.float32)
    got, expected = filled(rounds).since(0), dense_sum(rounds, 0)
    for m, ref in expected.items():
        assert got[m].left.dtype == torch.float32
        assert torch.linalg.matrix_norm(got[m].dense().double() - ref) <= 1e-5 * torch.linalg.matrix_norm(ref)


def test_repeated_direction_is_compressed_to_its_true_rank():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(3, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, 50, generator=gen, dtype=torch.float64)
    h = filled([{"m": LowRank(u * (r + 1), v)} for r in range(ROUNDS)])  # stacked inner dimension 6 > 3 rows
    got = h.since(0)["m"]
    ref = 21 * (u @ v)
    assert got.rank == int(torch.linalg.matrix_rank(ref)) == 1
    assert torch.linalg.matrix_norm(got.dense() - ref) <= 1e-12 * torch.linalg.matrix_norm(ref)


def test_float32_sum_keeps_small_directions():
    # A (3, 4096) module: six rank-1 rounds stack to inner dimension 6 > 3, so the sum is re-compressed.
    # The second direction is ~2e-4 of the first, under float32's default cut-off (8 eps 4096 = 4e-3).
    gen = torch.Generator().manual_seed(2)
    u = torch.linalg.qr(torch.randn(3, 2, generator=gen, dtype=torch.float64)).Q
    v = torch.randn(2, 4096, generator=gen, dtype=torch.float64)
    rounds = [{"m": LowRank(u[:, :1], v[:1])} for _ in range(5)] + [{"m": LowRank(1e-3 * u[:, 1:], v[1:])}]
    rounds = [{m: LowRank(c.left.float(), c.right.float()) for m, c in r.items()} for r in rounds]
    got, ref = filled(rounds).since(0)["m"], dense_sum(rounds, 0)["m"]
    assert got.left.dtype == torch.float32 and got.rank == 2
    assert torch.linalg.matrix_norm(got.dense().double() - ref) <= 1e-6 * torch.linalg.matrix_norm(ref)


def test_append_and_since_bounds():
    h = CorrectionHistory()
    assert h.latest == 0 and h.since(0) == {}
    with pytest.raises(ValueError, match="expected round 1"):
        h.append(0, {})
    h.append(1, {})
    for bad in (1, 3):
        with pytest.raises(ValueError, match="expected round 2"):
            h.append(bad, {})
    with pytest.raises(ValueError):
        h.append(2, {"m": torch.zeros(2, 2)})
    for bad in (-1, 2):
        with pytest.raises(ValueError, match="version"):
            h.since(bad)
    with pytest.raises(ValueError):
        CorrectionHistory(latest=3)  # existing rounds need a loader


def test_mismatched_shapes_name_the_module():
    h = filled([{"q": LowRank(torch.ones(2, 1), torch.ones(1, 3))},
                {"q": LowRank(torch.ones(3, 1), torch.ones(1, 3))}])
    with pytest.raises(ValueError, match="'q'"):
        h.since(0)


def test_loader_reads_only_the_rounds_it_needs():
    rounds = make_rounds(3)
    calls: list[int] = []

    def load(r: int) -> dict[str, LowRank]:
        calls.append(r)
        return rounds[r - 1]

    h = CorrectionHistory(load=load, latest=4)  # resumed after round 4; rounds 5 and 6 arrive later
    h.append(5, rounds[4])
    h.append(6, rounds[5])
    assert calls == []  # appending with a loader keeps nothing and reads nothing
    for version in (0, 2, 5, 6):
        calls.clear()
        got, expected = h.since(version), dense_sum(rounds, version)
        assert calls == list(range(version + 1, ROUNDS + 1))
        assert set(got) == set(expected)
        for m, ref in expected.items():
            assert torch.linalg.matrix_norm(got[m].dense() - ref) <= 1e-10 * torch.linalg.matrix_norm(ref)
