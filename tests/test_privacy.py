"""Privacy accounting against Opacus's accountants stepped by hand; update norms and bounds against dense float64."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fedlora.privacy import (
    bound_updates, check_delta, clip_update, default_delta, epsilon_spent, noise_multiplier, update_norm,
)
from fedlora.types import LoRAFactors

opacus = pytest.importorskip("opacus")


# ---------------------------------------------------------------- accounting

def _opacus_epsilon(kind: str, history, delta: float) -> float:
    """The reference: a fresh Opacus accountant stepped once per step, as Opacus's own optimizer does."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    acc = RDPAccountant() if kind == "rdp" else PRVAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta=delta)


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@pytest.mark.parametrize("history", [[(1.1, 16 / 500, 30)], [(0.8, 0.05, 20), (1.3, 0.02, 45)]])
def test_reported_epsilon_is_opacus_epsilon(kind, history):
    delta = 1e-4
    assert epsilon_spent(history, delta, kind) == pytest.approx(_opacus_epsilon(kind, history, delta), rel=1e-9)
    assert epsilon_spent([], delta, kind) == 0.0


@pytest.mark.parametrize("kind", ["rdp", "prv"])
@pytest.mark.parametrize("target", [1.0, 3.0, 8.0])
def test_derived_noise_spends_the_target_epsilon_at_the_same_delta(kind, target):
    n, batch, steps = 400, 16, 150
    delta = default_delta(n)
    sigma = noise_multiplier(target, delta, batch / n, steps, kind)
    spent = _opacus_epsilon(kind, [(sigma, batch / n, steps)], delta)
    assert spent <= target * 1.0001 and spent >= target * 0.97  # Opacus's search tolerance is 0.01
    assert _opacus_epsilon(kind, [(sigma * 0.9, batch / n, steps)], delta) > target  # and not much more noise


def test_delta_at_or_above_one_over_n_is_refused_in_one_line():
    n = 250
    assert default_delta(n) < 1 / n and check_delta(default_delta(n), n) == default_delta(n)
    for bad in (1 / n, 0.01, 1.0, 0.0, -1e-5):
        with pytest.raises(ValueError) as info:
            check_delta(bad, n)
        text = str(info.value)
        assert "\n" not in text and "privacy.delta" in text and "1/n" in text


# ---------------------------------------------------------------- update norms and bounds

def _factors(gen, shapes, rank, scale, dtype=torch.float64):
    return {m: LoRAFactors(torch.randn(o, rank, generator=gen, dtype=dtype),
                           torch.randn(rank, i, generator=gen, dtype=dtype), scale) for m, (o, i) in shapes.items()}


def _dense_norm(start, trained) -> float:
    return math.sqrt(sum(float(((f.delta() - start[m].delta()).double() ** 2).sum()) for m, f in trained.items()))


SHAPES = {"q": (7, 5), "v": (4, 9)}


def test_update_norm_is_the_dense_norm():
    gen = torch.Generator().manual_seed(0)
    start, trained = _factors(gen, SHAPES, 3, 0.5), _factors(gen, SHAPES, 3, 0.5)
    assert update_norm(start, trained) == pytest.approx(_dense_norm(start, trained), rel=1e-12)
    assert update_norm(start, start) == pytest.approx(0.0, abs=1e-12)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), rank=st.integers(1, 4), scale=st.floats(0.01, 10),
       spread=st.floats(1e-3, 1e3), fraction=st.one_of(st.just(0.0), st.floats(0.01, 1.5)))
def test_a_clipped_update_never_exceeds_the_bound(seed, rank, scale, spread, fraction):
    gen = torch.Generator().manual_seed(seed)
    start = _factors(gen, SHAPES, rank, scale)
    noise = _factors(gen, SHAPES, rank, scale)
    trained = {m: LoRAFactors(f.B + spread * noise[m].B, f.A + spread * noise[m].A, scale) for m, f in start.items()}
    bound = fraction * _dense_norm(start, trained)
    clipped, t = clip_update(start, trained, bound)
    assert _dense_norm(start, clipped) <= bound * (1 + 1e-9) + 1e-12
    assert 0.0 <= t <= 1.0
    if fraction > 1 + 1e-9:  # (at exactly 1, rounding decides whether the factored norm is above)
        assert clipped is trained and t == 1.0
    elif fraction < 1:  # clipped, but not to nothing: the bisection lands next to the bound
        assert _dense_norm(start, clipped) >= bound * (1 - 1e-6)


def test_an_update_1000x_the_median_is_clipped_or_rejected():
    gen = torch.Generator().manual_seed(4)
    start = _factors(gen, SHAPES, 2, 1.0)
    updates = {f"c{i}": {m: LoRAFactors(f.B + 0.1 * torch.randn(f.B.shape, generator=gen, dtype=f.B.dtype), f.A,
                                        1.0) for m, f in start.items()} for i in range(5)}
    typical = _dense_norm(start, updates["c0"])
    updates["wild"] = {m: LoRAFactors(start[m].B + (updates["c0"][m].B - start[m].B) * 1000, f.A, 1.0)
                       for m, f in start.items()}
    norms = {cid: update_norm(start, u) for cid, u in updates.items()}
    assert norms["wild"] == pytest.approx(1000 * typical, rel=1e-9)
    for mode in ("clip", "reject"):
        decided = bound_updates(norms, factor=10, mode=mode)
        assert decided["wild"].action == mode
        assert all(decided[c].action == "keep" for c in updates if c != "wild")
        if mode == "clip":
            clipped, _ = clip_update(start, updates["wild"], decided["wild"].bound)
            assert _dense_norm(start, clipped) <= decided["wild"].bound * (1 + 1e-9)
    nan = dict(norms, broken=float("nan"))
    assert bound_updates(nan, factor=10, mode="clip")["broken"].action == "reject"
    with pytest.raises(ValueError, match="factor must be >= 1"):
        bound_updates(norms, factor=0.5, mode="clip")
