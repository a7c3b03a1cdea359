"""Device profiles and the simulated round time against hand-computed numbers.

Every expected time below is worked out by hand in a comment; the seeded draws are checked against numpy
called directly with the documented seed sequence.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from fedlora.devices import (
    DEFAULT_CLASSES,
    ClientTime,
    DeviceProfile,
    assign_profiles,
    client_time,
    round_time,
    speed_factor,
)

PHONE = DeviceProfile("phone", speed=1e9, up=1e6, down=4e6, memory=2e9)


def test_client_time_by_hand():
    # compute 10 steps * 3e9 FLOPs / 1e9 FLOP/s = 30 s; down 8e6 B / 4e6 B/s = 2 s; up 5e5 B / 1e6 B/s = 0.5 s
    t = client_time(PHONE, step_flops=3e9, steps=10, bytes_down=8_000_000, bytes_up=500_000)
    assert (t.compute_s, t.down_s, t.up_s) == pytest.approx((30.0, 2.0, 0.5))
    assert t.total_s == pytest.approx(32.5)
    # half speed this round: compute doubles, communication unchanged
    slow = client_time(PHONE, step_flops=3e9, steps=10, bytes_down=8_000_000, bytes_up=500_000,
                       speed_factor=0.5)
    assert (slow.compute_s, slow.down_s, slow.up_s) == pytest.approx((60.0, 2.0, 0.5))


def test_client_time_rejects_bad_input():
    with pytest.raises(ValueError, match="steps"):
        client_time(PHONE, 1.0, -1, 0, 0)
    with pytest.raises(ValueError, match="speed_factor"):
        client_time(PHONE, 1.0, 1, 0, 0, speed_factor=0.0)


def test_round_time_without_deadline_is_the_slowest_client():
    times = {"a": ClientTime(10.0, 1.0, 1.0), "b": ClientTime(3.0, 2.0, 2.0), "c": ClientTime(20.0, 0.0, 0.5)}
    r = round_time(times)  # totals 12, 7, 20.5
    assert r.wall_s == pytest.approx(20.5)
    assert r.slowest == "c"
    assert r.stragglers == []
    assert r.times == times


def test_round_time_with_deadline():
    times = {"a": ClientTime(10.0, 1.0, 1.0), "b": ClientTime(3.0, 2.0, 2.0), "c": ClientTime(20.0, 0.0, 0.5)}
    # deadline 15: c (20.5) is dropped, the server waited the whole 15 s; slowest kept is a (12)
    r = round_time(times, deadline_s=15.0)
    assert (r.wall_s, r.slowest, r.stragglers) == (15.0, "a", ["c"])
    # deadline 25: nobody dropped, the round ends when c does
    r = round_time(times, deadline_s=25.0)
    assert (r.wall_s, r.slowest, r.stragglers) == (20.5, "c", [])
    # deadline 5: everyone dropped
    r = round_time(times, deadline_s=5.0)
    assert (r.wall_s, r.slowest, sorted(r.stragglers)) == (5.0, None, ["a", "b", "c"])
    assert round_time({}).wall_s == 0.0


def test_assign_profiles_largest_remainder_counts():
    classes = {n: DeviceProfile(n, 1.0, 1.0, 1.0, 1.0) for n in "abc"}
    ids = [f"c{i}" for i in range(20)]
    got = assign_profiles(ids, classes, {"a": 0.5, "b": 0.3, "c": 0.2}, seed=0)
    assert sorted(got) == sorted(ids)
    counts = {n: sum(p.name == n for p in got.values()) for n in "abc"}
    assert counts == {"a": 10, "b": 6, "c": 4}
    # 7 clients over unnormalised 1:1:1: quotas 7/3 each -> 2, 2, 2 and the one left to the first listed
    got = assign_profiles(ids[:7], classes, {"a": 1, "b": 1, "c": 1}, seed=0)
    assert sorted(p.name for p in got.values()) == ["a", "a", "a", "b", "b", "c", "c"]
    # 10 clients over 0.14 / 0.43 / 0.43: quotas 1.4, 4.3, 4.3 -> 1, 4, 4 + the one left to a (.4 > .3)
    got = assign_profiles(ids[:10], classes, {"a": 0.14, "b": 0.43, "c": 0.43}, seed=0)
    assert {n: sum(p.name == n for p in got.values()) for n in "abc"} == {"a": 2, "b": 4, "c": 4}


def test_assign_profiles_is_seeded():
    classes = {n: DeviceProfile(n, 1.0, 1.0, 1.0, 1.0) for n in "ab"}
    ids = [f"c{i}" for i in range(30)]
    shares = {"a": 0.5, "b": 0.5}
    first = assign_profiles(ids, classes, shares, seed=3)
    assert assign_profiles(ids, classes, shares, seed=3) == first
    assert assign_profiles(ids, classes, shares, seed=4) != first


def test_assign_profiles_rejects_bad_input():
    classes = {"a": DeviceProfile("a", 1.0, 1.0, 1.0, 1.0)}
    with pytest.raises(ValueError, match="'tablet'"):
        assign_profiles(["c0"], classes, {"tablet": 1.0}, seed=0)
    with pytest.raises(ValueError, match="positive sum"):
        assign_profiles(["c0"], classes, {"a": 0.0}, seed=0)
    with pytest.raises(ValueError, match=">= 0"):
        assign_profiles(["c0"], classes, {"a": -1.0}, seed=0)


@pytest.mark.parametrize("bad", ["speed", "up", "down", "memory"])
def test_profile_rejects_non_positive_fields(bad):
    fields = dict(speed=1.0, up=1.0, down=1.0, memory=1.0)
    for value in (0.0, -1.0, math.nan):
        with pytest.raises(ValueError, match=bad):
            DeviceProfile("x", **{**fields, bad: value})
    with pytest.raises(ValueError, match="jitter"):
        DeviceProfile("x", **fields, jitter=-0.1)


def test_speed_factor():
    assert speed_factor(PHONE, seed=1, round_idx=2, client_index=3) == 1.0
    shaky = DeviceProfile("shaky", speed=1e9, up=1e6, down=1e6, memory=1e9, jitter=0.3)
    got = speed_factor(shaky, seed=1, round_idx=2, client_index=3)
    expected = math.exp(np.random.default_rng([1, 2, 3, 13]).normal(0.0, 0.3))
    assert got == pytest.approx(expected, rel=1e-12)
    assert speed_factor(shaky, seed=1, round_idx=2, client_index=3) == got
    others = {speed_factor(shaky, 1, r, c) for r in range(3) for c in range(3)}
    assert len(others) == 9 and all(f > 0 for f in others)


def test_default_classes_are_4x_apart():
    fast, slow = DEFAULT_CLASSES["fast"], DEFAULT_CLASSES["slow"]
    assert fast.speed / slow.speed == 4 and fast.up / slow.up == 4 and fast.down / slow.down == 4
    assert all(p.name == name for name, p in DEFAULT_CLASSES.items())
