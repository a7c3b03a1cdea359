"""Round messages as Flower record content: content -> message gives back every field bit for bit, the
byte count is what travels, and malformed content fails with a one-line MessageError.

The reference is always the message that went in (compared field by field, tensors bit for bit, floats by
their IEEE bits) or the container's own header and byte counts. Builders and comparison are copied,
trimmed, from tests/protocol/test_messages.py.
"""

from __future__ import annotations

import io
import json
import struct

import pytest

pytest.importorskip("flwr")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict  # noqa: E402

from fedlora.flower import (  # noqa: E402
    HEADER_RECORD,
    TENSOR_RECORD,
    content_tensor_bytes,
    content_to_reply,
    content_to_task,
    reply_to_content,
    task_to_content,
)
from fedlora.protocol import (  # noqa: E402
    ClientTask,
    MessageError,
    TrainSettings,
    encode_reply,
    encode_task,
    reply_tensor_bytes,
    task_tensor_bytes,
)
from fedlora.types import LoRAFactors  # noqa: E402

pytestmark = pytest.mark.usefixtures("torch_single_thread")

from flower_builders import CLIENT_IDS, SHAPES, make_reply, make_task  # noqa: E402
from message_builders import assert_one_line_error, assert_same  # noqa: E402


# ---------------------------------------------------------------- helpers

def container_header(data: bytes) -> dict:
    n = struct.unpack("<Q", data[:8])[0]
    return json.loads(json.loads(data[8 : 8 + n])["__metadata__"]["fedlora"])


def over_the_wire(content: RecordDict) -> RecordDict:
    """The content after both ways Flower 1.41 moves it: its object store (deflate each nested object,
    inflate from the bytes) and the protobuf the link state keeps."""
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents

    objects = {oid: obj.deflate() for oid, obj in get_all_nested_objects(content).items()}
    inflated = inflate_object_from_contents(content.object_id, objects)
    assert isinstance(inflated, RecordDict)
    proto = ProtoRecordDict.FromString(recorddict_to_proto(inflated).SerializeToString())
    return recorddict_from_proto(proto)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("seed", range(4))
def test_task_round_trip(seed):
    task = make_task(seed, CLIENT_IDS[seed % len(CLIENT_IDS)])
    content = task_to_content(task)
    assert set(content) == {HEADER_RECORD, TENSOR_RECORD}
    assert isinstance(content[HEADER_RECORD], ConfigRecord)
    assert isinstance(content[TENSOR_RECORD], ArrayRecord)
    # the header is the container's, field for field
    assert json.loads(content[HEADER_RECORD]["header"]) == container_header(encode_task(task))
    for back in (content_to_task(content), content_to_task(over_the_wire(content))):
        assert_same(task, back, "task")
    assert content_to_task(content).frozen[next(iter(SHAPES))].left.shape == (8, 0)
    arrays = content[TENSOR_RECORD]
    assert arrays["adapter.0.B"].dtype == "float32" and arrays["adapter.0.B"].stype == "numpy.ndarray"
    assert arrays["adapter.0.B"].numpy().dtype == np.float32  # a plain Flower Array any app can read


@pytest.mark.parametrize("sent_a", [True, False])
@pytest.mark.parametrize("histogram", [True, False])
@pytest.mark.parametrize("seed", range(2))
def test_reply_round_trip(seed, histogram, sent_a):
    reply = make_reply(seed, histogram, sent_a)
    content = reply_to_content(reply)
    assert json.loads(content[HEADER_RECORD]["header"]) == container_header(encode_reply(reply))
    for back in (content_to_reply(content), content_to_reply(over_the_wire(content))):
        assert_same(reply, back, "reply")
    names = set(content[TENSOR_RECORD])
    assert any(n.endswith(".A") for n in names) == sent_a  # a B-only reply carries no A
    assert ("label_histogram.0.value" in names) == histogram
    if histogram:
        assert content[TENSOR_RECORD]["label_histogram.0.value"].dtype == "float64"


def test_defaults_nan_and_shared_tensors():
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    task = ClientTask(round=0, client_id="c", rank=2, head={"a": base, "b": base, "t": base.T},
                      adapter={"m": LoRAFactors(base[:, :2], torch.tensor([[float("nan")] * 3] * 2), 1.0)})
    content = task_to_content(task)
    assert content[TENSOR_RECORD]["head.0.value"] == content[TENSOR_RECORD]["head.1.value"]
    back = content_to_task(over_the_wire(content))  # the wire stores the two equal Arrays once
    assert_same(task, back, "task")
    assert back.head["a"].data_ptr() != back.head["b"].data_ptr()
    assert back.modules is None and back.train == TrainSettings() and back.catch_up_from is None


# ---------------------------------------------------------------- sizes

@pytest.mark.parametrize("message", [make_task(1), make_task(3), make_reply(0), make_reply(1, False, False)],
                         ids=["task1", "task-empty-module", "reply", "reply-b-only"])
def test_content_tensor_bytes(message):
    if isinstance(message, ClientTask):
        content, counted = task_to_content(message), task_tensor_bytes(message)
    else:
        content, counted = reply_to_content(message), reply_tensor_bytes(message)
    assert content_tensor_bytes(content) == counted
    assert content_tensor_bytes(over_the_wire(content)) == counted
    by_hand = sum(a.numpy().nbytes if a.stype == "numpy.ndarray" else len(a.data)
                  for a in content[TENSOR_RECORD].values())
    assert by_hand == counted
    extra = RecordDict({**content, "more": ArrayRecord({"x": Array(np.zeros((2, 3), np.float64))})})
    assert content_tensor_bytes(extra) == counted + 48  # every ArrayRecord counts


# ---------------------------------------------------------------- malformed content

def npy(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    return buf.getvalue()


def with_array(content: RecordDict, name: str, array: Array | None) -> RecordDict:
    """A copy of ``content`` whose tensor record has ``name`` set to ``array`` (None: removed)."""
    arrays = {k: v for k, v in content[TENSOR_RECORD].items() if k != name}
    if array is not None:
        arrays[name] = array
    return RecordDict({HEADER_RECORD: content[HEADER_RECORD], TENSOR_RECORD: ArrayRecord(arrays)})


def with_header(content: RecordDict, edit) -> RecordDict:
    header = json.loads(content[HEADER_RECORD]["header"])
    edit(header)
    return RecordDict({HEADER_RECORD: ConfigRecord({"header": json.dumps(header)}),
                       TENSOR_RECORD: content[TENSOR_RECORD]})


def f32(a) -> Array:
    return Array(np.asarray(a, dtype=np.float32))


def header_record(value) -> ConfigRecord:
    return ConfigRecord({"header": value})


def records(c: RecordDict, **replace) -> RecordDict:
    """A copy of ``c`` with the header (``h=``) or tensor (``t=``) record replaced."""
    return RecordDict({HEADER_RECORD: replace.get("h", c[HEADER_RECORD]),
                       TENSOR_RECORD: replace.get("t", c[TENSOR_RECORD])})


B = "adapter.0.B"  # (8, 2) float32 in make_task(1)


def b_as(c: RecordDict, *, dtype="float32", shape=(8, 2), stype="numpy.ndarray", data=None) -> RecordDict:
    """``c`` with adapter.0.B replaced by an Array of these fields (default: B's own)."""
    data = c[TENSOR_RECORD][B].data if data is None else data(c[TENSOR_RECORD][B].data)
    return with_array(c, B, Array(dtype=dtype, shape=shape, stype=stype, data=data))


def bf16_head(**fields) -> callable:
    return lambda c: with_array(c, "head.0.value", Array(**{"dtype": "bfloat16", "shape": (2, 8),
                                                            "stype": "fedlora.raw", **fields}))


PICKLED = npy(np.zeros((8, 2))).replace(b"'<f8'", b"'|O' ")  # same header length, object dtype
TASK_CASES = {
    # records
    "not a RecordDict": (lambda c: dict(c), "expected a RecordDict"),
    "no header record": (lambda c: RecordDict({TENSOR_RECORD: c[TENSOR_RECORD]}),
                         "missing record 'fedlora.header'"),
    "no tensor record": (lambda c: RecordDict({HEADER_RECORD: c[HEADER_RECORD]}),
                         "missing record 'fedlora.tensors'"),
    "header record type": (lambda c: records(c, h=MetricRecord({"header": 1.0})),
                           "must be of type ConfigRecord"),
    "tensor record type": (lambda c: records(c, t=ConfigRecord({"x": 1})), "must be of type ArrayRecord"),
    "unknown record": (lambda c: RecordDict({**c, "surprise": ConfigRecord({"x": 1})}), "unknown record"),
    "header key": (lambda c: records(c, h=ConfigRecord({"hdr": "{}"})), "exactly the key 'header'"),
    "header extra key": (lambda c: records(c, h=ConfigRecord({**c[HEADER_RECORD], "x": 1})),
                         "exactly the key"),
    "header bytes": (lambda c: records(c, h=header_record(b"{}")), "JSON string"),
    "header not JSON": (lambda c: records(c, h=header_record("{not json")), "not a fedlora message"),
    # header fields: the protocol's own checks
    "unknown format": (lambda c: with_header(c, lambda h: h.update(format="fedlora.task/2")), "version"),
    "foreign format": (lambda c: with_header(c, lambda h: h.update(format="other/1")),
                       "not a fedlora message"),
    "reply format": (lambda c: with_header(c, lambda h: h.update(format="fedlora.reply/1")),
                     "expected a fedlora.task message"),
    "missing field": (lambda c: with_header(c, lambda h: h.pop("seed")), "missing field 'seed'"),
    "unknown field": (lambda c: with_header(c, lambda h: h.update(surprise=1)), "unknown field"),
    "field type": (lambda c: with_header(c, lambda h: h.update(rank="2")), "rank"),
    # arrays against the header
    "missing array": (lambda c: with_array(c, "head.1.value", None), "missing tensor"),
    "extra array": (lambda c: with_array(c, "stowaway", f32([1.0])), "unexpected tensor"),
    "not chaining": (lambda c: with_array(c, "adapter.0.A", f32(np.zeros((9, 6)))), "do not chain"),
    "rank mismatch": (lambda c: with_array(with_array(c, "adapter.1.B", f32(np.zeros((5, 9)))),
                                           "adapter.1.A", f32(np.zeros((9, 7)))), "declares rank"),
    "frozen shape": (lambda c: with_array(c, "frozen.1.left", f32(np.zeros((4, 3)))), "the adapter is"),
    # one array against itself
    "declared dtype": (lambda c: b_as(c, dtype="float64"), "declares 'float64'"),
    "declared shape": (lambda c: b_as(c, shape=(2, 8)), "its payload is 'float32' (8, 2)"),
    "negative shape": (lambda c: b_as(c, shape=(-8, 2)), "ints >= 0"),
    "string dtype": (lambda c: with_array(c, B, Array(np.array([["a", "b"]] * 8))), "not a native bool"),
    "big-endian": (lambda c: with_array(c, B, Array(np.zeros((8, 2), ">f4"))), "not a native bool"),
    "structured": (lambda c: with_array(c, B, Array(np.zeros(8, [("x", "<f4"), ("y", "<f4")]))),
                   "not a native"),
    "object dtype": (lambda c: b_as(c, dtype="object", data=lambda d: PICKLED), "not a native bool"),
    "not npy": (lambda c: b_as(c, data=lambda d: b"\x00" * 64), "not a .npy payload"),
    "npy header cut": (lambda c: b_as(c, data=lambda d: d[:20]), "not a .npy payload"),
    "npy data cut": (lambda c: b_as(c, data=lambda d: d[:-4]), "payload holds 60 data bytes"),
    "npy trailing": (lambda c: b_as(c, data=lambda d: d + b"\0"), "payload holds 65 data bytes"),
    "unknown stype": (lambda c: b_as(c, stype="pickle"), "unknown stype 'pickle'"),
    "raw size": (bf16_head(data=b"\0" * 31), "payload holds 31 bytes"),
    "raw dtype": (bf16_head(dtype="float128", data=b"\0" * 32), "dtype in"),
    "raw float32": (bf16_head(dtype="float32", data=b"\0" * 64), "dtype in"),
    "complex128": (lambda c: with_array(c, B, Array(np.zeros((8, 2), np.complex128))), "cannot repack"),
}


@pytest.mark.parametrize("name", list(TASK_CASES))
def test_malformed_task_content(name):
    edit, match = TASK_CASES[name]
    content = task_to_content(make_task(1))
    assert content[TENSOR_RECORD][B].shape == (8, 2)
    assert content[TENSOR_RECORD]["head.0.value"].stype == "fedlora.raw"  # the bfloat16 head
    assert_one_line_error(content_to_task, edit(content), match=match)


def test_malformed_reply_content():
    b_only = reply_to_content(make_reply(0, sent_a=False))
    a_array = reply_to_content(make_reply(0))[TENSOR_RECORD]["factors.0.A"]
    assert_one_line_error(content_to_reply, with_array(b_only, "factors.0.A", a_array),
                          match="unexpected tensor")
    assert_one_line_error(content_to_reply, with_header(b_only, lambda h: h.pop("factors_in_features")),
                          match="factors_in_features")
    full = reply_to_content(make_reply(0))
    assert_one_line_error(content_to_reply, with_array(full, "factors.1.A", None), match="missing tensor")
    assert_one_line_error(content_to_reply, with_header(full, lambda h: h.update(num_examples=-1)),
                          match="num_examples")
    assert_one_line_error(content_to_reply, task_to_content(make_task(0)), match="expected a fedlora.reply")
    assert_one_line_error(content_to_task, full, match="expected a fedlora.task")
    assert_one_line_error(content_tensor_bytes, with_array(full, "factors.0.B", Array(
        dtype="float32", shape=(8, 3), stype="numpy.ndarray", data=b"junk")), match="not a .npy payload")
    assert_one_line_error(content_tensor_bytes, {"not": "a RecordDict"}, match="expected a RecordDict")


def tiny_task(head: torch.Tensor) -> ClientTask:
    return ClientTask(round=0, client_id="c", rank=1, head={"h": head},
                      adapter={"m": LoRAFactors(torch.ones(2, 1), torch.ones(1, 2), 1.0)})


OTHER_DTYPES = [torch.float16, torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2, torch.complex64,
                torch.bool, torch.int8, torch.int64, torch.uint8, torch.uint16]
UNENCODABLE = [torch.complex128] + [getattr(torch, n) for n in ["float8_e8m0fnu"] if hasattr(torch, n)]


@pytest.mark.parametrize("dtype", OTHER_DTYPES, ids=str)
def test_other_dtypes_round_trip(dtype):
    """Whatever dtype the container carries, the content carries too (numpy's as .npy, the rest raw)."""
    for shape in [(3, 5), (0, 5)]:
        task = tiny_task(torch.randn(*shape, generator=torch.Generator().manual_seed(0)).to(dtype))
        try:
            encode_task(task)
        except (MessageError, KeyError):  # KeyError: the container lets safetensors' through
            pytest.skip(f"this safetensors has no {dtype}")
        content = task_to_content(task)
        assert_same(task, content_to_task(over_the_wire(content)), str(dtype))
        assert content_tensor_bytes(content) == task_tensor_bytes(task)


@pytest.mark.parametrize("dtype", UNENCODABLE, ids=str)
def test_unencodable_dtype_is_a_message_error(dtype):
    # complex128: safetensors has no such dtype; float8_e8m0fnu: safetensors 0.8 writes it but cannot read it
    assert_one_line_error(task_to_content, tiny_task(torch.ones(2, 2).to(dtype)), match="cannot encode")
