"""A bit-exact comparison of protocol messages and the one-line error check, shared by the protocol and
Flower tests."""

from __future__ import annotations

import dataclasses
import math
import struct

import pytest
import torch

from fedlora.protocol import ClientReply, ClientTask, MessageError, TrainSettings
from fedlora.types import LoRAFactors, LowRank


def float_bits(x: float) -> bytes:
    return struct.pack("<d", x)


def raw_bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().flatten().view(torch.uint8)


def assert_same(a, b, path: str = "") -> None:
    """Equal structure and types; tensors equal dtype, shape and bytes; floats equal IEEE bits."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{path}: {a.dtype} {list(a.shape)} vs {b.dtype}"
        if not (a.is_floating_point() and a.isnan().any()):  # torch.equal is False on NaN; the bytes decide
            assert torch.equal(a, b), path
        assert torch.equal(raw_bytes(a), raw_bytes(b)), path
    elif isinstance(a, (LoRAFactors, LowRank, TrainSettings, ClientTask, ClientReply)):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name), f"{path}.{f.name}")
    elif isinstance(a, dict):
        assert list(a) == list(b), f"{path}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, float):
        assert (math.isnan(a) and math.isnan(b)) or float_bits(a) == float_bits(b), f"{path}: {a!r} != {b!r}"
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def assert_one_line_error(fn, *args, match: str | None = None) -> str:
    with pytest.raises(MessageError) as info:
        fn(*args)
    text = str(info.value)
    assert text and "\n" not in text and len(text) < 400, repr(text)
    if match is not None:
        assert match in text, text
    return text
