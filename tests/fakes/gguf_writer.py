"""Writes small GGUF files (v2/v3, little-endian) for tests of the GGUF header reader.

`gguf_bytes(metadata, tensors)` encodes a header; Python values are typed automatically
(str → string, bool → bool, int → uint32 or uint64, float → float32, list → array) and
`Typed(type_id, value)` forces a type. Tensor data is not written unless asked: the reader never
looks at it. Raw helpers let tests craft broken files.
"""

from __future__ import annotations

import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

UINT8, INT8, UINT16, INT16, UINT32, INT32, FLOAT32, BOOL, STRING, ARRAY = range(10)
UINT64, INT64, FLOAT64 = 10, 11, 12
_FORMATS = {
    UINT8: "<B",
    INT8: "<b",
    UINT16: "<H",
    INT16: "<h",
    UINT32: "<I",
    INT32: "<i",
    FLOAT32: "<f",
    BOOL: "<?",
    UINT64: "<Q",
    INT64: "<q",
    FLOAT64: "<d",
}
GGML_Q4_K = 12


@dataclass(frozen=True, slots=True)
class Typed:
    """A metadata value with an explicit GGUF type (for arrays: `item_type` too)."""

    type_id: int
    value: object
    item_type: int | None = None


@dataclass(frozen=True, slots=True)
class Tensor:
    name: str
    shape: tuple[int, ...]
    type_id: int = GGML_Q4_K
    offset: int = 0


def string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def value_bytes(value: object) -> tuple[int, bytes]:
    """(type id, encoded payload without the type id) of a metadata value."""
    typed = value if isinstance(value, Typed) else _infer(value)
    if typed.type_id in _FORMATS:
        return typed.type_id, struct.pack(_FORMATS[typed.type_id], typed.value)
    if typed.type_id == STRING:
        assert isinstance(typed.value, str | bytes)
        return STRING, string(typed.value)
    assert typed.type_id == ARRAY and isinstance(typed.value, list | tuple)
    items = [v if isinstance(v, Typed) else _infer(v) for v in typed.value]
    item_type = typed.item_type if typed.item_type is not None else items[0].type_id
    payload = b"".join(value_bytes(Typed(item_type, i.value, i.item_type))[1] for i in items)
    return ARRAY, struct.pack("<IQ", item_type, len(items)) + payload


def gguf_bytes(
    metadata: Mapping[str, object],
    tensors: Sequence[Tensor] = (),
    *,
    version: int = 3,
    data_bytes: int = 0,
) -> bytes:
    """A whole GGUF file: header, metadata, tensor infos, then `data_bytes` zero bytes."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(metadata))]
    for key, value in metadata.items():
        type_id, payload = value_bytes(value)
        out += [string(key), struct.pack("<I", type_id), payload]
    for tensor in tensors:
        out += [string(tensor.name), struct.pack("<I", len(tensor.shape))]
        out += [struct.pack("<Q", extent) for extent in tensor.shape]
        out.append(struct.pack("<IQ", tensor.type_id, tensor.offset))
    return b"".join(out) + bytes(data_bytes)


def write_gguf(
    path: Path,
    metadata: Mapping[str, object],
    tensors: Sequence[Tensor] = (),
    *,
    version: int = 3,
    data_bytes: int = 0,
) -> Path:
    path.write_bytes(gguf_bytes(metadata, tensors, version=version, data_bytes=data_bytes))
    return path


def llama_metadata(arch: str = "llama", **overrides: object) -> dict[str, object]:
    """Typical metadata of a small transformer; `overrides` use `_` for `.` in keys."""
    metadata: dict[str, object] = {
        "general.architecture": arch,
        "general.name": "Tiny Test",
        "general.file_type": Typed(UINT32, 15),
        f"{arch}.block_count": 4,
        f"{arch}.context_length": 2048,
        f"{arch}.embedding_length": 256,
        f"{arch}.attention.head_count": 8,
        f"{arch}.attention.head_count_kv": 2,
    }
    metadata.update({k.replace("__", "."): v for k, v in overrides.items()})
    return metadata


def _infer(value: object) -> Typed:
    if isinstance(value, bool):
        return Typed(BOOL, value)
    if isinstance(value, int):
        return Typed(UINT32 if 0 <= value < 2**32 else INT64, value)
    if isinstance(value, float):
        return Typed(FLOAT32, value)
    if isinstance(value, str | bytes):
        return Typed(STRING, value)
    if isinstance(value, list | tuple):
        return Typed(ARRAY, list(value))
    raise TypeError(f"cannot encode {value!r} as GGUF metadata")
