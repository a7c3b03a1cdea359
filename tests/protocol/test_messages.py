"""Round messages: encode -> decode gives back every field bit for bit, sizes add up, bad bytes fail.

The reference is always the message that went in (compared field by field, tensors bit for bit, floats by
their IEEE bits) or a hand count of tensor bytes. Malformed inputs are built with safetensors' own
functions and a hand parse of the container, not with the code under test.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct

import pytest
import safetensors.torch
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedlora.protocol import (
    ClientReply,
    ClientTask,
    MessageError,
    TrainSettings,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
    message_sizes,
    reply_tensor_bytes,
    task_tensor_bytes,
)
from fedlora.types import LoRAFactors, LowRank
from message_builders import assert_one_line_error, assert_same

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# Module names with dots, slashes and non-ASCII, as real PEFT names and odd runtimes produce them.
SHAPES = {"base_model.model.encoder.layer.0.attention.self.query": (8, 6), "layer.1/value": (5, 7),
          "módulo ü": (3, 3)}
SCALES = [1 / 3, 16 / math.sqrt(7), 5e-324, 0.1 + 0.2]  # a subnormal and a classic rounding case
CLIENT_IDS = ["hospital-a", "0", "", "клиника/β 7", 'quote"back\\slash\nnewline']


# ---------------------------------------------------------------- builders

def rand(gen: torch.Generator, *shape: int, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def make_task(seed: int, client_id: str = "hospital-a") -> ClientTask:
    gen = torch.Generator().manual_seed(seed)
    rank = [1, 2, 4][seed % 3]
    dtypes = [torch.float64, torch.float32, torch.float64]
    adapter = {
        m: LoRAFactors(rand(gen, d_out, rank, dtype=dt), rand(gen, rank, d_in, dtype=dt),
                       SCALES[(i + seed) % 4])
        for i, ((m, (d_out, d_in)), dt) in enumerate(zip(SHAPES.items(), dtypes))
    }
    names = list(SHAPES)
    (m0, (a0, b0)), (m1, (a1, b1)) = list(SHAPES.items())[:2]
    return ClientTask(
        round=seed, client_id=client_id, rank=rank, adapter=adapter,
        frozen={m0: LowRank(torch.zeros(a0, 0, dtype=torch.float64), torch.zeros(0, b0, dtype=torch.float64)),
                m1: LowRank(rand(gen, a1, 3, dtype=torch.float64), rand(gen, 3, b1, dtype=torch.float64))},
        train_a=bool(seed % 2), train_b=True, modules=[names[2], names[0]],
        head={"classifier.dense.weight": rand(gen, 2, 8, dtype=torch.bfloat16),
              "classifier.dense.bias": rand(gen, 2)},
        train=TrainSettings(local_steps=None, local_epochs=1.5, batch_size=8, lr=3e-4, weight_decay=0.01,
                            warmup_steps=2, max_grad_norm=None, optimizer_state="kept"),
        proximal_mu=0.01, seed=[12345, seed, 7],
        catch_up={m1: LowRank(rand(gen, a1, 5), rand(gen, 5, b1))}, catch_up_from=1, catch_up_to=seed + 3,
        privacy={"clip": 1.0, "noise_multiplier": None},
        extra={"note": "x", "nested": {"a": [1, 2.5, "s", True, None]}, "big": 2**70},
    )


def make_reply(seed: int, histogram: bool = True) -> ClientReply:
    gen = torch.Generator().manual_seed(seed)
    m, (d_out, d_in) = next(iter(SHAPES.items()))
    return ClientReply(
        round=seed, client_id=CLIENT_IDS[seed % len(CLIENT_IDS)], rank=3,
        factors={m: LoRAFactors(rand(gen, d_out, 3), rand(gen, 3, d_in), SCALES[seed % 4]),
                 "second": LoRAFactors(rand(gen, 2, 3, dtype=torch.float64),
                                       rand(gen, 3, 4, dtype=torch.float64), 2.0)},
        head={"score.weight": rand(gen, 3, 6, dtype=torch.bfloat16)},
        num_examples=117 + seed,
        label_histogram=torch.tensor([3.0, 0.0, 114.0], dtype=torch.float64) if histogram else None,
        train_loss=0.6931471805599453, metrics={"accuracy": 0.75, "steps": 30.0},
    )


def tensors_of(obj) -> list[torch.Tensor]:
    """Every tensor a message holds, by walking its fields."""
    out = []
    for value in (getattr(obj, f.name) for f in dataclasses.fields(obj)):
        items = value.values() if isinstance(value, dict) else [value]
        for v in items:
            if isinstance(v, LoRAFactors):
                out += [v.B, v.A]
            elif isinstance(v, LowRank):
                out += [v.left, v.right]
            elif isinstance(v, torch.Tensor):
                out.append(v)
    return out


# ---------------------------------------------------------------- comparison

# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("seed", range(6))
def test_task_round_trip(seed):
    task = make_task(seed, CLIENT_IDS[seed % len(CLIENT_IDS)])
    back = decode_task(encode_task(task))
    assert_same(task, back, "task")
    assert back.frozen[next(iter(SHAPES))].left.shape == (8, 0)  # zero-rank frozen term survives


@pytest.mark.parametrize("histogram", [True, False])
@pytest.mark.parametrize("seed", range(4))
def test_reply_round_trip(seed, histogram):
    reply = make_reply(seed, histogram)
    assert_same(reply, decode_reply(encode_reply(reply)), "reply")


@given(client_id=st.text(max_size=20), scale=st.floats(), loss=st.floats(),
       metric=st.floats(allow_nan=False), n=st.integers(0, 2**62))
def test_reply_round_trip_any_id_and_float(client_id, scale, loss, metric, n):
    reply = ClientReply(round=3, client_id=client_id, rank=1,
                        factors={"m": LoRAFactors(torch.ones(2, 1), torch.ones(1, 2), scale)},
                        num_examples=n, train_loss=loss, metrics={client_id: metric})
    assert_same(reply, decode_reply(encode_reply(reply)), "reply")


def test_nan_tensor_is_not_malformed_and_defaults_round_trip():
    task = ClientTask(round=0, client_id="c", rank=1,
                      adapter={"m": LoRAFactors(torch.tensor([[float("nan")]]), torch.ones(1, 1), 1.0)})
    back = decode_task(encode_task(task))
    assert_same(task, back, "task")
    assert back.modules is None and back.train == TrainSettings() and back.catch_up_from is None


def test_shared_and_strided_tensors_encode():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    head = {"a": base, "b": base, "c": base[:2], "t": base.T}  # the same buffer four times, one transposed
    task = ClientTask(round=0, client_id="c", rank=2, head=head,
                      adapter={"m": LoRAFactors(base[:, :2], base[:2, :3].T.contiguous().T, 1.0)})
    back = decode_task(encode_task(task))
    for k, v in head.items():
        assert torch.equal(back.head[k], v)
    assert torch.equal(back.adapter["m"].B, base[:, :2]) and torch.equal(back.adapter["m"].A, base[:2, :3])


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("message",
                         [make_task(1), make_task(2), make_reply(0), make_reply(1, histogram=False)],
                         ids=["task1", "task2", "reply", "reply-no-histogram"])
def test_message_sizes(message):
    data = encode_task(message) if isinstance(message, ClientTask) else encode_reply(message)
    sizes = message_sizes(data)
    expected = sum(t.numel() * t.element_size() for t in tensors_of(message))
    assert sizes["tensor_bytes"] == expected
    counted = task_tensor_bytes(message) if isinstance(message, ClientTask) else reply_tensor_bytes(message)
    assert counted == expected
    assert sizes["tensor_bytes"] + sizes["header_bytes"] == len(data)
    assert sizes["header_bytes"] == 8 + struct.unpack("<Q", data[:8])[0]


# ---------------------------------------------------------------- malformed input

def split(data: bytes) -> tuple[dict, dict[str, torch.Tensor]]:
    """The fedlora header and the tensors of a message, read by hand and by safetensors."""
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["fedlora"]), safetensors.torch.load(data)


def join(header: dict, tensors: dict[str, torch.Tensor]) -> bytes:
    return safetensors.torch.save(tensors, metadata={"fedlora": json.dumps(header)})


def test_truncated_and_random_bytes():
    data = encode_task(make_task(0))
    cuts = sorted(set(range(0, len(data), max(1, len(data) // 50))) | {7, 8, 9, len(data) - 1})
    for cut in cuts:
        assert_one_line_error(decode_task, data[:cut])
        assert_one_line_error(message_sizes, data[:cut])
    assert_one_line_error(decode_task, data + b"\x00")
    gen = torch.Generator().manual_seed(0)
    for size in (0, 5, 8, 100, 4096):
        garbage = bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())
        assert_one_line_error(decode_task, garbage)
        assert_one_line_error(decode_reply, garbage)
    assert_one_line_error(decode_task, struct.pack("<Q", 2) + b"[]", match="JSON object")
    assert_one_line_error(decode_task, "not bytes", match="expected bytes")


def test_wrong_kind_and_foreign_files():
    task, reply = encode_task(make_task(0)), encode_reply(make_reply(0))
    assert_one_line_error(decode_task, reply, match="expected a fedlora.task message, got fedlora.reply/1")
    assert_one_line_error(decode_reply, task, match="expected a fedlora.reply message")
    bare = safetensors.torch.save({"w": torch.ones(2)})
    assert_one_line_error(decode_task, bare, match="not a fedlora message")
    plain = safetensors.torch.save({"w": torch.ones(2)}, metadata={"fedlora": "not json"})
    assert_one_line_error(decode_task, plain, match="not a fedlora message")


def test_every_missing_header_field_is_named():
    cases = [(encode_task(make_task(0)), decode_task), (encode_reply(make_reply(0)), decode_reply)]
    for data, decode in cases:
        header, tensors = split(data)
        assert len(header) > 5
        for name in header:
            broken = {k: v for k, v in header.items() if k != name}
            expected = "format" if name == "format" else f"missing field {name!r}"
            assert_one_line_error(decode, join(broken, tensors), match=expected)


def edited(data: bytes, edit) -> bytes:
    header, tensors = split(data)
    edit(header, tensors)
    return join(header, tensors)


TASK_EDITS = {
    "version": (lambda h, t: h.update(format="fedlora.task/2"), "version"),
    "unknown field": (lambda h, t: h.update(surprise=1), "unknown field"),
    "round type": (lambda h, t: h.update(round="3"), "round"),
    "negative rank": (lambda h, t: h.update(rank=-1), "rank"),
    "seed type": (lambda h, t: h.update(seed=[1, -2]), "seed"),
    "train field": (lambda h, t: h["train"].update(optimizer_state="sometimes"), "optimizer_state"),
    "train extra": (lambda h, t: h["train"].update(momentum=0.9), "train"),
    "scales short": (lambda h, t: h["adapter_scales"].pop(), "adapter_scales"),
    "duplicate module": (lambda h, t: h["adapter"].__setitem__(1, h["adapter"][0]), "distinct"),
    "unknown module": (lambda h, t: h.update(modules=["nope"]), "no adapter"),
    "versions": (lambda h, t: h.update(catch_up_from=None), "catch_up_from"),
    "not chaining": (lambda h, t: t.__setitem__("adapter.0.A", torch.zeros(9, 6)), "do not chain"),
    "rank mismatch": (lambda h, t: t.update({"adapter.1.B": torch.zeros(5, 9),
                                             "adapter.1.A": torch.zeros(9, 7)}), "declares rank"),
    "frozen chain": (lambda h, t: t.__setitem__("frozen.1.right", torch.zeros(2, 7)), "do not chain"),
    "frozen shape": (lambda h, t: t.update({"frozen.1.left": torch.zeros(4, 3)}), "the adapter is"),
    "missing tensor": (lambda h, t: t.pop("head.1.value"), "missing tensor"),
    "extra tensor": (lambda h, t: t.__setitem__("stowaway", torch.zeros(1)), "unexpected tensor"),
}


@pytest.mark.parametrize("name", list(TASK_EDITS))
def test_malformed_task_fields(name):
    edit, match = TASK_EDITS[name]
    assert_one_line_error(decode_task, edited(encode_task(make_task(1)), edit), match=match)


def test_malformed_reply_fields():
    data = encode_reply(make_reply(0))
    assert_one_line_error(decode_reply, edited(data, lambda h, t: h.update(num_examples=-1)),
                          match="num_examples")
    assert_one_line_error(decode_reply, edited(data, lambda h, t: h.update(metrics={"a": "b"})),
                          match="metrics")
    assert_one_line_error(decode_reply, edited(data, lambda h, t: h.update(label_histogram=["x"])),
                          match="label_histogram")
    assert_one_line_error(decode_reply, edited(data, lambda h, t: t.pop("label_histogram.0.value")),
                          match="missing tensor")


# ---------------------------------------------------------------- construction checks

def test_construction_and_encoding_checks():
    with pytest.raises(ValueError, match="exactly one"):
        TrainSettings(local_steps=5, local_epochs=1.0)
    with pytest.raises(ValueError, match="optimizer_state"):
        TrainSettings(optimizer_state="sometimes")
    adapter = {"m": LoRAFactors(torch.zeros(3, 2), torch.zeros(2, 4), 1.0)}
    assert_one_line_error(lambda: ClientTask(round=0, client_id="c", rank=2, adapter=adapter, modules=["x"]))
    assert_one_line_error(lambda: ClientTask(round=0, client_id="c", rank=3, adapter=adapter), match="rank")
    assert_one_line_error(lambda: ClientTask(round=0, client_id="c", rank=2, adapter=adapter,
                                             catch_up={"m": LowRank(torch.ones(3, 1), torch.ones(1, 4))}),
                          match="catch_up")
    task = ClientTask(round=0, client_id="c", rank=2, adapter=adapter)
    task.extra = {"pair": (1, 2)}  # a tuple would come back as a list: not lossless, so refused
    assert_one_line_error(encode_task, task, match="extra")
    task.extra = {1: "int key"}
    assert_one_line_error(encode_task, task, match="extra")


WRONG_VALUES = [None, "x", -1, 0, 1.5, float("nan"), [], {}, True, [1], ["a"], [None], {"a": 1}, [-1]]


def test_any_wrong_header_value_is_a_message_error():
    """Every field, every wrong type: a decoded message or a MessageError, never another exception."""
    cases = [(encode_task(make_task(1)), decode_task), (encode_reply(make_reply(0)), decode_reply)]
    for data, decode in cases:
        header, tensors = split(data)
        targets = [(header, k) for k in header] + [(header["train"], k) for k in header.get("train", {})]
        for where, key in targets:
            original = where[key]
            for value in WRONG_VALUES:
                where[key] = value
                try:
                    decode(join(header, tensors))
                except MessageError as err:
                    assert "\n" not in str(err)
            where[key] = original


def test_corrupted_header_bytes_never_escape_as_other_errors():
    data = encode_task(make_task(1))
    header_end = 8 + struct.unpack("<Q", data[:8])[0]
    gen = torch.Generator().manual_seed(1)
    for _ in range(300):
        corrupt = bytearray(data)
        for i in torch.randint(0, header_end, (3,), generator=gen).tolist():
            corrupt[i] = int(torch.randint(0, 256, (1,), generator=gen))
        try:
            decode_task(bytes(corrupt))
        except MessageError as err:
            assert "\n" not in str(err)


def test_a_dtype_safetensors_cannot_store_is_a_one_line_message_error():
    task = make_task(0)
    m = next(iter(task.adapter))
    f = task.adapter[m]
    task.adapter[m] = LoRAFactors(f.B.to(torch.complex128), f.A.to(torch.complex128), f.scale)
    with pytest.raises(MessageError, match="cannot encode the message") as err:
        encode_task(task)
    assert "\n" not in str(err.value)
