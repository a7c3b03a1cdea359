"""Round messages as the content of a Flower :class:`~flwr.app.Message`.

The content is the protocol's container unpacked into Flower records, nothing more:

* ``content["fedlora.header"]``: a :class:`~flwr.app.ConfigRecord` with one entry, ``"header"``, the
  container's JSON header as a string (``format``, every non-tensor field, the module names of each group
  in order). A ConfigRecord holds only scalars and flat lists of one type, with no ``None``, no nested
  objects and no int beyond 64 bits, so the header travels as one JSON string, exactly as in the container.
* ``content["fedlora.tensors"]``: an :class:`~flwr.app.ArrayRecord` of every tensor under its container
  name, positional like ``adapter.0.B`` / ``frozen.1.left`` / ``head.0.value`` (the header names the
  modules, so any module name survives and order is kept). An :class:`~flwr.app.Array` is a ``.npy``
  payload (``stype "numpy.ndarray"``), so dtype, shape and bits are kept, empty ``(m, 0)`` / ``(0, n)``
  factors included. Dtypes numpy lacks (``bfloat16``, ``float8_*``) travel as their raw little-endian bytes
  under ``stype "fedlora.raw"``.

Encoding runs :func:`~fedlora.protocol.encode_task` / :func:`~fedlora.protocol.encode_reply` and splits
the result; decoding repacks the records and runs :func:`~fedlora.protocol.decode_task` /
:func:`~fedlora.protocol.decode_reply`. So the field layout, the checks and their one-line
:class:`~fedlora.protocol.MessageError` messages are the protocol's own; this module adds the checks of the
Flower layer (records present and of the right type, every Array's declared dtype and shape equal to its
payload, payload sizes exact, no object, structured or byte-swapped arrays). A reply that sent only ``B``
carries no ``A`` arrays. Nothing is unpickled: ``.npy`` headers are parsed by numpy's literal reader, sizes
are checked before any allocation, and the data is read with ``frombuffer``. The price of reusing the
container is a few in-memory copies of the tensors per conversion, small next to a round of training.

This package is the only one in fedlora that imports ``flwr``.
"""

from __future__ import annotations

import io
import math
from typing import Any

import numpy as np
import safetensors.torch
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from safetensors import SafetensorError

from ..protocol import (
    ClientReply,
    ClientTask,
    MessageError,
    decode_reply,
    decode_task,
    encode_reply,
    encode_task,
)
from ..protocol.container import _META_KEY, _is_int, _need, _read_header

HEADER_RECORD = "fedlora.header"
TENSOR_RECORD = "fedlora.tensors"
HEADER_KEY = "header"
NUMPY_STYPE = "numpy.ndarray"  # flwr.common.constant.SType.NUMPY, what Array(ndarray) writes
RAW_STYPE = "fedlora.raw"  # a tensor's bytes, C order, little-endian: for dtypes numpy has no type for
# The dtypes numpy lacks that the protocol's container round-trips (those this torch has). safetensors 0.8
# writes float8_e8m0fnu and float4_e2m1fn_x2 but cannot read them back, so they are not here.
_RAW_DTYPES = {name: getattr(torch, name) for name in (
    "bfloat16", "float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
    if isinstance(getattr(torch, name, None), torch.dtype)}
_NUMPY_KINDS = "biufc"  # bool, signed and unsigned ints, floats, complex: what torch.from_numpy takes


# ---------------------------------------------------------------- public API

def task_to_content(task: ClientTask) -> RecordDict:
    """``task`` as Flower message content; :func:`content_to_task` restores it bit for bit."""
    return _to_content(encode_task(task))


def content_to_task(content: RecordDict) -> ClientTask:
    """Inverse of :func:`task_to_content`; raises :class:`MessageError` on anything malformed."""
    return decode_task(_to_container(content, "task"))


def reply_to_content(reply: ClientReply) -> RecordDict:
    """``reply`` as Flower message content; :func:`content_to_reply` restores it bit for bit."""
    return _to_content(encode_reply(reply))


def content_to_reply(content: RecordDict) -> ClientReply:
    """Inverse of :func:`reply_to_content`; raises :class:`MessageError` on anything malformed."""
    return decode_reply(_to_container(content, "reply"))


def content_tensor_bytes(content: RecordDict) -> int:
    """Bytes of every array payload in ``content`` (numpy ``nbytes``; headers of ``.npy`` payloads excluded).

    Equals :func:`~fedlora.protocol.task_tensor_bytes` / :func:`~fedlora.protocol.reply_tensor_bytes` of the
    message the content encodes. Counts the arrays of every ArrayRecord, reading only ``.npy`` headers.
    """
    _need(isinstance(content, RecordDict), "content", f"expected a RecordDict, got {type(content).__name__}")
    total = 0
    for record_name, record in content.items():
        if isinstance(record, ArrayRecord):
            for name, array in record.items():
                total += _payload(f"{record_name}/{name}", array, "content")[3]
    return total


# ---------------------------------------------------------------- encoding

def _to_content(container: bytes) -> RecordDict:
    """Split a container (our own, just encoded) into its JSON header and its tensors, as records."""
    header = _read_header(container)[0]["__metadata__"][_META_KEY]
    try:
        tensors = safetensors.torch.load(container)
    except (SafetensorError, KeyError) as err:  # KeyError: a dtype safetensors writes but cannot read
        raise MessageError(f"cannot encode the message: safetensors cannot read back dtype {err}") from None
    arrays = {name: _to_array(name, t) for name, t in tensors.items()}
    return RecordDict({HEADER_RECORD: ConfigRecord({HEADER_KEY: header}),
                       TENSOR_RECORD: ArrayRecord(arrays, keep_input=False)})


def _to_array(name: str, t: torch.Tensor) -> Array:
    dtype = str(t.dtype).removeprefix("torch.")
    if dtype in _RAW_DTYPES:
        data = t.contiguous().flatten().view(torch.uint8).numpy().tobytes()
        return Array(dtype=dtype, shape=tuple(t.shape), stype=RAW_STYPE, data=data)
    try:
        return Array.from_numpy_ndarray(t.numpy())
    except TypeError as err:  # a torch dtype numpy has no type for
        raise MessageError(f"cannot encode tensor {name!r} as a Flower Array: {err}") from None


# ---------------------------------------------------------------- decoding

def _to_container(content: Any, kind: str) -> bytes:
    """The container the content unpacks: the header string and the tensors, repacked as safetensors."""
    where = f"{kind} content"
    _need(isinstance(content, RecordDict), where, f"expected a RecordDict, got {type(content).__name__}")
    for name, cls in ((HEADER_RECORD, ConfigRecord), (TENSOR_RECORD, ArrayRecord)):
        _need(name in content, where, f"missing record {name!r}")
        _need(isinstance(content[name], cls), where,
              f"record {name!r} must be of type {cls.__name__}, got {type(content[name]).__name__}")
    unknown = sorted(set(content) - {HEADER_RECORD, TENSOR_RECORD})
    _need(not unknown, where, f"unknown record {unknown[:1]}")
    config = content[HEADER_RECORD]
    _need(list(config) == [HEADER_KEY], where,
          f"record {HEADER_RECORD!r} must hold exactly the key {HEADER_KEY!r}, got {sorted(config)[:3]}")
    header = config[HEADER_KEY]
    _need(isinstance(header, str), where,
          f"{HEADER_RECORD}[{HEADER_KEY!r}] must be a JSON string, got {type(header).__name__}")
    tensors = {name: _to_tensor(name, array, where) for name, array in content[TENSOR_RECORD].items()}
    try:
        return safetensors.torch.save(tensors, metadata={_META_KEY: header})
    except (SafetensorError, ValueError, TypeError, RuntimeError, KeyError) as err:  # KeyError: no such dtype
        raise MessageError(f"{where}: cannot repack the arrays: {type(err).__name__}: {err}") from None


def _payload(name: str, array: Any, kind: str) -> tuple[Any, bool, int, int]:
    """``(dtype, fortran_order, offset, nbytes)`` of an Array's data, checked against what it declares.

    ``dtype`` is a numpy dtype for ``.npy`` payloads and a torch dtype for raw ones; the data is
    ``array.data[offset : offset + nbytes]``, which is all of it after the ``.npy`` header.
    """
    where = f"{kind}: array {name!r}"
    _need(isinstance(array, Array), where, f"expected a flwr Array, got {type(array).__name__}")
    shape, data, declared = array.shape, array.data, array.dtype
    _need(isinstance(shape, tuple) and all(_is_int(s, 0) for s in shape), where,
          f"shape must be a tuple of ints >= 0, got {shape!r:.60}")
    _need(isinstance(data, bytes), where, f"data must be bytes, got {type(data).__name__}")
    if array.stype == RAW_STYPE:
        _need(declared in _RAW_DTYPES, where,
              f"a {RAW_STYPE!r} array must have dtype in {sorted(_RAW_DTYPES)}, got {declared!r:.40}")
        dtype = _RAW_DTYPES[declared]
        nbytes = math.prod(shape) * dtype.itemsize
        _need(len(data) == nbytes, where,
              f"payload holds {len(data)} bytes, {declared} {shape} needs {nbytes}")
        return dtype, False, 0, nbytes
    _need(array.stype == NUMPY_STYPE, where,
          f"unknown stype {array.stype!r:.40}; expected {NUMPY_STYPE!r} or {RAW_STYPE!r}")
    buffer = io.BytesIO(data)
    try:
        version = np.lib.format.read_magic(buffer)
        if version == (1, 0):
            npy_shape, fortran, dtype = np.lib.format.read_array_header_1_0(buffer)
        elif version == (2, 0):
            npy_shape, fortran, dtype = np.lib.format.read_array_header_2_0(buffer)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except (ValueError, OSError, EOFError, SyntaxError, TypeError) as err:
        raise MessageError(f"{where}: not a .npy payload: {err}") from None
    _need(dtype.kind in _NUMPY_KINDS and dtype.names is None and dtype.subdtype is None and dtype.isnative,
          where, f"payload dtype {dtype.str} is not a native bool, int, float or complex dtype")
    _need((str(dtype), tuple(npy_shape)) == (declared, shape), where,
          f"declares {declared!r:.40} {shape}, its payload is {str(dtype)!r} {tuple(npy_shape)}")
    offset, nbytes = buffer.tell(), math.prod(shape) * dtype.itemsize
    _need(len(data) - offset == nbytes, where,
          f"payload holds {len(data) - offset} data bytes, {declared} {shape} needs {nbytes}")
    return dtype, bool(fortran), offset, nbytes


def _to_tensor(name: str, array: Any, kind: str) -> torch.Tensor:
    dtype, fortran, offset, nbytes = _payload(name, array, kind)
    shape = array.shape
    if array.stype == RAW_STYPE:
        flat = torch.frombuffer(bytearray(array.data), dtype=dtype) if nbytes else torch.empty(0, dtype=dtype)
        return flat.reshape(shape)
    values = np.frombuffer(array.data, dtype=dtype, count=math.prod(shape), offset=offset)
    # frombuffer is a read-only view of the Array's bytes: copy into a C-ordered array torch may own.
    return torch.from_numpy(np.array(values.reshape(shape, order="F" if fortran else "C"), order="C"))
