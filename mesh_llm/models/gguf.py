"""Reader of GGUF file headers (versions 2 and 3, little-endian) and memory estimates.

`read_gguf_info(path)` parses the metadata key/values and tensor infos of a GGUF file — and of
every part when given the first part of a split model — but never the tensor data, and returns
a `GGUFInfo`. Every count and length is checked against the bytes left in the file, so a
truncated or hostile file raises `GGUFError` instead of allocating absurd amounts. Tensor types
are not interpreted (element counts do not need them), so new quantizations are tolerated.
Blocking; callers use a thread for big files. Imports no network code.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from mesh_llm.errors import GGUFError, ModelError
from mesh_llm.models.splits import part_paths

_MAGIC = b"GGUF"
_SUPPORTED_VERSIONS = (2, 3)
_MAX_STRING_BYTES = 16 * 1024 * 1024
_MAX_ITEMS = 1 << 28
_MAX_DIMS = 8
_MAX_DIM = 1 << 48
_KEPT_ARRAY_ITEMS = 4096
_STRING, _ARRAY = 8, 9
_SCALARS: dict[int, struct.Struct] = {
    0: struct.Struct("<B"),
    1: struct.Struct("<b"),
    2: struct.Struct("<H"),
    3: struct.Struct("<h"),
    4: struct.Struct("<I"),
    5: struct.Struct("<i"),
    6: struct.Struct("<f"),
    7: struct.Struct("<?"),
    10: struct.Struct("<Q"),
    11: struct.Struct("<q"),
    12: struct.Struct("<d"),
}
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# llama.cpp's `llama_ftype` values (general.file_type) → the usual quantization names.
FILE_TYPE_NAMES: dict[int, str] = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S",
    29: "IQ2_M", 30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0",
    38: "MXFP4_MOE",
}  # fmt: skip

MetadataValue = int | float | bool | str | tuple[object, ...] | None


@dataclass(frozen=True, slots=True)
class GGUFInfo:
    """What a GGUF header says about a model; missing integer fields are 0."""

    version: int
    architecture: str
    name: str | None
    block_count: int
    context_length: int
    embedding_length: int
    head_count: int
    head_count_kv: int
    key_length: int
    value_length: int
    expert_count: int
    file_type: int
    quant: str
    tensor_count: int
    parameter_count: int
    size_bytes: int
    split_count: int
    pooling_type: int = -1  # `<arch>.pooling_type` (llama_pooling_type); -1: absent
    fill_in_middle: bool = False  # has FIM prefix/suffix/middle token ids (infill)
    chat_template: bool = False  # has `tokenizer.chat_template`


def read_gguf_info(path: Path) -> GGUFInfo:
    """Parse the header of the GGUF file at `path` (all parts if it is a split's first part).

    `size_bytes` is the file size summed over parts. Raises `GGUFError` for anything that is
    not a readable GGUF v2/v3 header, `ModelError` for missing split parts.
    """
    try:
        parts = part_paths(path)
    except ModelError:
        if not path.is_file():
            raise GGUFError(f"{path} does not exist or is not a file") from None
        raise
    metadata, tensor_count, parameters, version = _read_header(parts[0])
    for part in parts[1:]:
        _, part_tensors, part_parameters, _ = _read_header(part)
        tensor_count += part_tensors
        parameters += part_parameters
    return _info(metadata, version, tensor_count, parameters, parts)


def estimate_kv_cache_bytes(info: GGUFInfo, ctx_size: int) -> int:
    """Bytes of an f16 K+V cache for `ctx_size` tokens (llama.cpp's default cache type).

    2 bytes × layers × tokens × KV heads × (key + value head dimension). Missing fields fall
    back to the head dimension `embedding_length / head_count`, then to 128, and to as many KV
    heads as attention heads (or 8), and 32 layers — a deliberately generous guess.
    """
    layers = info.block_count or 32
    heads = info.head_count or 0
    kv_heads = info.head_count_kv or heads or 8
    head_dim = info.embedding_length // heads if heads and info.embedding_length else 128
    key_dim = info.key_length or head_dim
    value_dim = info.value_length or head_dim
    return 2 * layers * max(ctx_size, 0) * kv_heads * (key_dim + value_dim)


def _info(
    metadata: dict[str, MetadataValue],
    version: int,
    tensor_count: int,
    parameters: int,
    parts: list[Path],
) -> GGUFInfo:
    architecture = metadata.get("general.architecture")
    if not isinstance(architecture, str) or not architecture:
        raise GGUFError(f"{parts[0]} has no general.architecture: not a model GGUF file")

    def number(key: str) -> int:
        value = metadata.get(f"{architecture}.{key}")
        if isinstance(value, tuple):  # per-layer values (e.g. KV heads): take the largest
            value = max((v for v in value if isinstance(v, int)), default=0)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    file_type = metadata.get("general.file_type")
    file_type = file_type if isinstance(file_type, int) else -1
    name = metadata.get("general.name")
    return GGUFInfo(
        version=version,
        architecture=architecture,
        name=name if isinstance(name, str) else None,
        block_count=number("block_count"),
        context_length=number("context_length"),
        embedding_length=number("embedding_length"),
        head_count=number("attention.head_count"),
        head_count_kv=number("attention.head_count_kv"),
        key_length=number("attention.key_length"),
        value_length=number("attention.value_length"),
        expert_count=number("expert_count"),
        file_type=file_type,
        quant=FILE_TYPE_NAMES.get(file_type, "unknown"),
        tensor_count=tensor_count,
        parameter_count=parameters,
        size_bytes=sum(p.stat().st_size for p in parts),
        split_count=len(parts),
        pooling_type=_int_or(metadata.get(f"{architecture}.pooling_type"), -1),
        fill_in_middle=_has_fim(metadata),
        chat_template=isinstance(metadata.get("tokenizer.chat_template"), str),
    )


_FIM_KEYS = (
    ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
)


def _has_fim(metadata: dict[str, MetadataValue]) -> bool:
    return all(any(_int_or(metadata.get(k), -1) >= 0 for k in keys) for keys in _FIM_KEYS)


def _int_or(value: MetadataValue, default: int) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def _read_header(path: Path) -> tuple[dict[str, MetadataValue], int, int, int]:
    """(metadata, tensor count, parameter count, version) of one GGUF file."""
    try:
        with path.open("rb", buffering=1024 * 1024) as file:
            reader = _Reader(file, path, path.stat().st_size)
            version = reader.header()
            tensor_count = reader.count(min_item_bytes=24, what="tensor count")
            kv_count = reader.count(min_item_bytes=12, what="metadata count")
            metadata: dict[str, MetadataValue] = {}
            for _ in range(kv_count):
                key = reader.string()
                metadata[key] = reader.value(reader.u32(), depth=0)
            parameters = sum(reader.tensor_elements() for _ in range(tensor_count))
    except OSError as exc:
        raise GGUFError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return metadata, tensor_count, parameters, version


class _Reader:
    """Sequential little-endian reads that never go past the end of the file."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        self._file = file
        self._path = path
        self._size = size
        self._position = 0

    def fail(self, problem: str) -> GGUFError:
        where = f"at byte {self._position}"
        return GGUFError(f"{self._path} is not a valid GGUF file: {problem} {where}")

    def read(self, size: int) -> bytes:
        if size > self._size - self._position:
            raise self.fail(f"truncated (needs {size} more bytes)")
        data = self._file.read(size)
        if len(data) != size:
            raise self.fail("truncated")
        self._position += size
        return data

    def skip(self, size: int) -> None:
        if size > self._size - self._position:
            raise self.fail(f"truncated (needs {size} more bytes)")
        self._file.seek(size, 1)
        self._position += size

    def u32(self) -> int:
        value: int = _U32.unpack(self.read(4))[0]
        return value

    def u64(self) -> int:
        value: int = _U64.unpack(self.read(8))[0]
        return value

    def header(self) -> int:
        if self._size < len(_MAGIC):
            raise self.fail(f"too short ({self._size} bytes)")
        magic = self.read(len(_MAGIC))
        if magic != _MAGIC:
            raise self.fail(f"bad magic {magic!r} (expected b'GGUF')")
        version = self.u32()
        if version not in _SUPPORTED_VERSIONS:
            if version.to_bytes(4, "little")[::-1] in (b"\2\0\0\0", b"\3\0\0\0"):
                raise self.fail("big-endian GGUF files are not supported")
            raise self.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
        return version

    def count(self, *, min_item_bytes: int, what: str) -> int:
        value = self.u64()
        if value > _MAX_ITEMS or value * min_item_bytes > self._size - self._position:
            raise self.fail(f"absurd {what} {value}")
        return value

    def string(self) -> str:
        length = self.u64()
        if length > _MAX_STRING_BYTES:
            raise self.fail(f"absurd string length {length}")
        return self.read(length).decode("utf-8", errors="replace")

    def value(self, value_type: int, *, depth: int) -> MetadataValue:
        scalar = _SCALARS.get(value_type)
        if scalar is not None:
            result: int | float | bool = scalar.unpack(self.read(scalar.size))[0]
            return result
        if value_type == _STRING:
            return self.string()
        if value_type == _ARRAY and depth < 2:
            return self.array(depth)
        raise self.fail(f"unknown metadata value type {value_type}")

    def array(self, depth: int) -> tuple[object, ...] | None:
        item_type = self.u32()
        scalar = _SCALARS.get(item_type)
        item_bytes = scalar.size if scalar else 8 if item_type == _STRING else 12
        length = self.count(min_item_bytes=item_bytes, what="array length")
        if length <= _KEPT_ARRAY_ITEMS:
            return tuple(self.value(item_type, depth=depth + 1) for _ in range(length))
        # Big arrays (the tokenizer's tokens, scores, merges) are not needed: skip them.
        if scalar is not None:
            self.skip(length * scalar.size)
        elif item_type == _STRING:
            for _ in range(length):
                self.skip_string()
        else:
            for _ in range(length):
                self.value(item_type, depth=depth + 1)
        return None

    def skip_string(self) -> None:
        length = self.u64()
        if length > _MAX_STRING_BYTES:
            raise self.fail(f"absurd string length {length}")
        self.skip(length)

    def tensor_elements(self) -> int:
        self.string()  # name
        dims = self.u32()
        if dims > _MAX_DIMS:
            raise self.fail(f"absurd tensor dimension count {dims}")
        elements = 1
        for _ in range(dims):
            extent = self.u64()
            if extent > _MAX_DIM:
                raise self.fail(f"absurd tensor extent {extent}")
            elements *= extent
        self.skip(4 + 8)  # tensor type (any value tolerated) and data offset
        return elements
