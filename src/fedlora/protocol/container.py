"""The container every protocol message travels in: one safetensors blob, a JSON header in its metadata.

Tensors keep dtype and bits (empty ``(m, 0)`` / ``(0, n)`` ones included); the header carries every other
field. Nothing is pickled, so reading untrusted bytes runs no code; every malformed input is a
:class:`MessageError` of one line.
"""

from __future__ import annotations

import json
import numbers
from typing import Any

import safetensors.torch
from safetensors import SafetensorError
from torch import Tensor

from ..types import LoRAFactors, LowRank

_META_KEY = "fedlora"


class MessageError(ValueError):
    """A message that cannot be built, encoded or decoded; the text is one line saying what is wrong."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))



def _is_int(x: Any, low: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= low


def _is_real(x: Any, low: float | None = None, *, strict: bool = False) -> bool:
    if not isinstance(x, numbers.Real) or isinstance(x, bool):
        return False
    return low is None or (x > low if strict else x >= low)


def _jsonable(x: Any) -> bool:
    """Survives a JSON round trip unchanged: no tuples, no non-string keys, no other objects."""
    if x is None or type(x) in (str, bool, int, float):  # exact types: subclasses would not come back
        return True
    if isinstance(x, list):
        return all(_jsonable(v) for v in x)
    return isinstance(x, dict) and all(isinstance(k, str) and _jsonable(v) for k, v in x.items())


def _need(ok: bool, kind: str, message: str) -> None:
    if not ok:
        raise MessageError(f"{kind}: {message}")



def _read_header(data: Any) -> tuple[dict, int]:
    """The safetensors header (a u64 little-endian length, then that much JSON) and where the data starts."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise MessageError(f"expected bytes, got {type(data).__name__}")
    if len(data) < 8:
        raise MessageError(f"truncated message: {len(data)} bytes, less than the 8-byte length prefix")
    n = int.from_bytes(bytes(data[:8]), "little")
    if n > len(data) - 8:
        raise MessageError(
            f"truncated message or not safetensors: header of {n} bytes, {len(data) - 8} follow"
        )
    try:
        header = json.loads(bytes(data[8 : 8 + n]))
    except ValueError:
        header = None
    if not isinstance(header, dict):
        raise MessageError("not a fedlora message: the safetensors header is not a JSON object")
    return header, 8 + n


def message_sizes(data: bytes) -> dict[str, int]:
    """``{"tensor_bytes": sum of numel * itemsize, "header_bytes": the rest}``, adding up to ``len(data)``.

    Works on any safetensors blob; a runtime reports bytes on the wire as the two parts.
    """
    header, start = _read_header(data)
    tensor_bytes = 0
    for name, info in header.items():
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if name != "__metadata__":
            if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o, 0) for o in offsets)
                    and offsets[0] <= offsets[1]):
                raise MessageError(f"corrupt safetensors header: bad data_offsets for tensor {name!r}")
            tensor_bytes += offsets[1] - offsets[0]
    if start + tensor_bytes != len(data):
        raise MessageError(
            f"truncated message: {len(data) - start} data bytes, the tensors need {tensor_bytes}"
        )
    return {"tensor_bytes": tensor_bytes, "header_bytes": len(data) - tensor_bytes}



def _nbytes(*tensors: Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _pack(header: dict, groups: dict[str, dict[str, tuple[Tensor, ...]]],
          parts: dict[str, str | tuple[str, ...]]) -> bytes:
    """Tensors ``{group}.{i}.{part}`` for the ``i``-th entry of each group; the header lists the names."""
    tensors: dict[str, Tensor] = {}
    storages: set[int] = set()
    for group, entries in groups.items():
        header[group] = list(entries)
        for i, values in enumerate(entries.values()):
            for part, t in zip(parts[group], values, strict=True):
                t = t.detach().cpu().contiguous()
                # safetensors refuses tensors that share memory (one head twice, views of one buffer).
                if t.numel() and t.untyped_storage().data_ptr() in storages:
                    t = t.clone()
                if t.numel():
                    storages.add(t.untyped_storage().data_ptr())
                tensors[f"{group}.{i}.{part}"] = t
    try:
        text = json.dumps(header, separators=(",", ":"))
        return safetensors.torch.save(tensors, metadata={_META_KEY: text})
    except (SafetensorError, ValueError, TypeError, RuntimeError, KeyError) as err:  # KeyError: a dtype it lacks
        raise MessageError(f"cannot encode the message: {err}") from None


class _Reader:
    """Header fields and tensor groups of one message; each must be taken exactly once."""

    def __init__(self, data: Any, fmt: str):
        kind, _, version = fmt.partition("/")
        header, _ = _read_header(data)
        meta = header.get("__metadata__")
        try:
            fields = json.loads(meta[_META_KEY]) if isinstance(meta, dict) else None
        except (KeyError, TypeError, ValueError):
            fields = None
        got = fields.get("format") if isinstance(fields, dict) else None
        if not isinstance(got, str) or not got.startswith("fedlora."):
            raise MessageError(f"not a fedlora message: no fedlora header with a format (found {got!r:.40})")
        got_kind, _, got_version = got.partition("/")
        if got_kind != kind:
            raise MessageError(f"expected a {kind} message, got {got}")
        if got_version != version:
            raise MessageError(f"unsupported {kind} version {got_version!r}; this reader knows {version!r}")
        try:
            self.tensors = safetensors.torch.load(bytes(data))
        except (SafetensorError, KeyError) as err:  # KeyError: a dtype safetensors writes but cannot read
            raise MessageError(f"corrupt or truncated tensor data: {err}") from None
        self.fields = {k: v for k, v in fields.items() if k != "format"}
        self.kind = kind.removeprefix("fedlora.")

    def value(self, name: str) -> Any:
        _need(name in self.fields, f"{self.kind} header", f"missing field {name!r}")
        return self.fields.pop(name)

    def group(self, name: str, parts: str | tuple[str, ...]) -> dict[str, list[Tensor]]:
        """``{entry name: [tensor per part]}`` of group ``name``."""
        names = self.value(name)
        _need(isinstance(names, list) and all(isinstance(n, str) for n in names)
              and len(set(names)) == len(names), f"{self.kind} header",
              f"field {name!r} must list distinct names")
        out = {}
        for i, entry in enumerate(names):
            keys = [f"{name}.{i}.{part}" for part in parts]
            missing = [k for k in keys if k not in self.tensors]
            _need(not missing, self.kind, f"missing tensor {missing[:1]} ({name} {entry!r})")
            out[entry] = [self.tensors.pop(k) for k in keys]
        return out

    def factors(self, name: str) -> dict[str, LoRAFactors]:
        tensors, scales = self.group(name, "BA"), self.value(f"{name}_scales")
        _need(isinstance(scales, list) and len(scales) == len(tensors) and all(_is_real(s) for s in scales),
              f"{self.kind} header", f"field '{name}_scales' must hold one number per module")
        return {m: LoRAFactors(B, A, float(s)) for (m, (B, A)), s in zip(tensors.items(), scales)}

    def terms(self, name: str) -> dict[str, LowRank]:
        out = {}
        for m, (left, right) in self.group(name, ("left", "right")).items():
            try:
                out[m] = LowRank(left, right)
            except ValueError as err:
                raise MessageError(f"{self.kind}: {name} of module {m!r}: {err}") from None
        return out

    def finish(self) -> None:
        _need(not self.fields, f"{self.kind} header", f"unknown field {sorted(self.fields)[:1]}")
        _need(not self.tensors, self.kind, f"unexpected tensor {sorted(self.tensors)[:1]}")
