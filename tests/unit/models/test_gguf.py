"""The GGUF header reader, on generated files, broken files and the real demo model."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_llm.errors import GGUFError, ModelError
from mesh_llm.models.gguf import GGUFInfo, estimate_kv_cache_bytes, read_gguf_info
from tests.fakes.gguf_writer import (
    FLOAT32,
    STRING,
    UINT8,
    Tensor,
    Typed,
    gguf_bytes,
    llama_metadata,
    string,
    write_gguf,
)

TENSORS = [
    Tensor("token_embd.weight", (256, 1000)),
    Tensor("blk.0.attn_q.weight", (256, 256)),
    Tensor("output_norm.weight", (256,), type_id=0),
]
PARAMETERS = 256 * 1000 + 256 * 256 + 256


def _header_prefix(tensor_count: int = 0, kv_count: int = 1) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, tensor_count, kv_count)


def test_reads_the_fields_of_a_generated_file(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "tiny.gguf", llama_metadata(), TENSORS, data_bytes=100)
    info = read_gguf_info(path)
    assert info.architecture == "llama"
    assert info.name == "Tiny Test"
    assert (info.block_count, info.context_length, info.embedding_length) == (4, 2048, 256)
    assert (info.head_count, info.head_count_kv, info.expert_count) == (8, 2, 0)
    assert (info.file_type, info.quant) == (15, "Q4_K_M")
    assert info.tensor_count == 3
    assert info.parameter_count == PARAMETERS
    assert info.size_bytes == path.stat().st_size
    assert (info.version, info.split_count) == (3, 1)


def test_endpoint_facts_pooling_fim_and_chat_template(tmp_path: Path) -> None:
    plain = read_gguf_info(write_gguf(tmp_path / "plain.gguf", llama_metadata(), TENSORS))
    assert (plain.pooling_type, plain.fill_in_middle, plain.chat_template) == (-1, False, False)
    metadata = llama_metadata(
        "bert",
        bert__pooling_type=Typed(4, 2),
        tokenizer__chat_template="{{ messages }}",
        tokenizer__ggml__fim_pre_token_id=Typed(4, 1),
        tokenizer__ggml__fim_suf_token_id=Typed(4, 2),
        tokenizer__ggml__fim_mid_token_id=Typed(4, 3),
    )
    info = read_gguf_info(write_gguf(tmp_path / "embed.gguf", metadata, TENSORS))
    assert (info.pooling_type, info.fill_in_middle, info.chat_template) == (2, True, True)
    partial_fim = llama_metadata(tokenizer__ggml__fim_pre_token_id=Typed(4, 1))
    info = read_gguf_info(write_gguf(tmp_path / "partial.gguf", partial_fim, TENSORS))
    assert not info.fill_in_middle


def test_version_2_and_moe_fields(tmp_path: Path) -> None:
    metadata = llama_metadata("qwen3moe", qwen3moe__expert_count=128)
    info = read_gguf_info(write_gguf(tmp_path / "m.gguf", metadata, TENSORS, version=2))
    assert (info.version, info.architecture, info.expert_count) == (2, "qwen3moe", 128)


def test_unknown_tensor_types_and_file_types_are_tolerated(tmp_path: Path) -> None:
    tensors = [Tensor("a", (10, 20), type_id=9999), Tensor("b", (7,), type_id=123456)]
    metadata = llama_metadata(general__file_type=Typed(5, 4242))
    info = read_gguf_info(write_gguf(tmp_path / "new.gguf", metadata, tensors))
    assert info.parameter_count == 207
    assert (info.file_type, info.quant) == (4242, "unknown")


def test_missing_fields_are_zero_and_missing_file_type_is_unknown(tmp_path: Path) -> None:
    info = read_gguf_info(write_gguf(tmp_path / "bare.gguf", {"general.architecture": "x"}))
    assert (info.block_count, info.head_count, info.expert_count, info.tensor_count) == (0,) * 4
    assert (info.file_type, info.quant, info.name) == (-1, "unknown", None)


def test_big_tokenizer_arrays_are_skipped_and_per_layer_arrays_kept(tmp_path: Path) -> None:
    metadata = llama_metadata(
        tokenizer__ggml__tokens=Typed(9, [f"tok{i}" for i in range(10_000)], STRING),
        tokenizer__ggml__scores=Typed(9, [0.5] * 10_000, FLOAT32),
        llama__attention__head_count_kv=[2, 4, 4, 1],
        nested=Typed(9, [[1, 2], [3]]),
        flags=Typed(9, [1] * 5000, UINT8),
    )
    info = read_gguf_info(write_gguf(tmp_path / "tok.gguf", metadata, TENSORS))
    assert info.head_count_kv == 4
    assert info.parameter_count == PARAMETERS


def test_not_gguf_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGML" + bytes(100))
    with pytest.raises(GGUFError, match="bad magic"):
        read_gguf_info(path)
    path.write_bytes(b"GG")
    with pytest.raises(GGUFError, match="too short"):
        read_gguf_info(path)


@pytest.mark.parametrize(("version", "problem"), [(1, "version 1"), (4, "version 4")])
def test_unsupported_versions(tmp_path: Path, version: int, problem: str) -> None:
    path = write_gguf(tmp_path / "v.gguf", llama_metadata(), version=version)
    with pytest.raises(GGUFError, match=problem):
        read_gguf_info(path)


def test_big_endian_is_named(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    path.write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 0))
    with pytest.raises(GGUFError, match="big-endian"):
        read_gguf_info(path)


def test_every_truncation_raises_gguf_error(tmp_path: Path) -> None:
    data = gguf_bytes(llama_metadata(tokenizer__ggml__tokens=["a", "bc"]), TENSORS)
    path = tmp_path / "cut.gguf"
    for size in range(len(data)):
        path.write_bytes(data[:size])
        with pytest.raises(GGUFError):
            read_gguf_info(path)
    path.write_bytes(data)
    assert read_gguf_info(path).tensor_count == 3


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (string("general.architecture") + struct.pack("<IQ", 8, 1 << 60), "string length"),
        (string("k") + struct.pack("<IIQ", 9, 6, 1 << 40), "array length"),
        (string("k") + struct.pack("<I", 77), "unknown metadata value type"),
        (struct.pack("<Q", 1 << 62) + b"key", "string length"),
    ],
)
def test_absurd_lengths_are_refused_without_allocating(
    tmp_path: Path, body: bytes, problem: str
) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(_header_prefix() + body + bytes(64))
    with pytest.raises(GGUFError, match=problem):
        read_gguf_info(path)


def test_absurd_counts_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "counts.gguf"
    path.write_bytes(_header_prefix(tensor_count=1 << 40, kv_count=0) + bytes(64))
    with pytest.raises(GGUFError, match="tensor count"):
        read_gguf_info(path)
    path.write_bytes(_header_prefix(tensor_count=0, kv_count=10_000) + bytes(64))
    with pytest.raises(GGUFError, match="metadata count"):
        read_gguf_info(path)


def test_absurd_tensor_dimensions_are_refused(tmp_path: Path) -> None:
    metadata = {"general.architecture": "llama"}
    path = write_gguf(tmp_path / "dims.gguf", metadata, [Tensor("t", (2,) * 9)])
    with pytest.raises(GGUFError, match="dimension count"):
        read_gguf_info(path)
    write_gguf(path, metadata, [Tensor("t", (1 << 60, 2))])
    with pytest.raises(GGUFError, match="extent"):
        read_gguf_info(path)


def test_file_without_architecture_is_refused(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "vocab.gguf", {"general.name": "vocab only"})
    with pytest.raises(GGUFError, match=r"general\.architecture"):
        read_gguf_info(path)


def test_missing_file_is_a_gguf_error(tmp_path: Path) -> None:
    with pytest.raises(GGUFError, match="does not exist"):
        read_gguf_info(tmp_path / "nothing.gguf")


def test_split_model_sums_parts(tmp_path: Path) -> None:
    first = write_gguf(
        tmp_path / "big-00001-of-00002.gguf",
        llama_metadata(split__count=Typed(2, 2)),
        TENSORS[:2],
        data_bytes=1000,
    )
    second = write_gguf(
        tmp_path / "big-00002-of-00002.gguf",
        {"general.architecture": "llama", "split.no": Typed(2, 1)},
        TENSORS[2:],
        data_bytes=500,
    )
    info = read_gguf_info(first)
    assert info.split_count == 2
    assert info.tensor_count == 3
    assert info.parameter_count == PARAMETERS
    assert info.size_bytes == first.stat().st_size + second.stat().st_size
    second.unlink()
    with pytest.raises(ModelError, match=r"missing big-00002-of-00002\.gguf"):
        read_gguf_info(first)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(position=st.integers(min_value=0), byte=st.integers(min_value=0, max_value=255))
def test_corrupted_bytes_never_raise_anything_but_gguf_error(
    tmp_path: Path, position: int, byte: int
) -> None:
    data = bytearray(gguf_bytes(llama_metadata(tokenizer__ggml__tokens=["a", "b"]), TENSORS))
    data[position % len(data)] = byte
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(data))
    try:
        info = read_gguf_info(path)
    except GGUFError:
        return
    assert info.tensor_count >= 0


def _info(**fields: int) -> GGUFInfo:
    base = {
        "version": 3,
        "architecture": "llama",
        "name": None,
        "block_count": 32,
        "context_length": 8192,
        "embedding_length": 4096,
        "head_count": 32,
        "head_count_kv": 8,
        "key_length": 0,
        "value_length": 0,
        "expert_count": 0,
        "file_type": 15,
        "quant": "Q4_K_M",
        "tensor_count": 291,
        "parameter_count": 8_000_000_000,
        "size_bytes": 4_900_000_000,
        "split_count": 1,
    }
    base.update(fields)
    return GGUFInfo(**base)  # type: ignore[arg-type]


def test_kv_cache_estimate_matches_llama_8b() -> None:
    # Llama 3.1 8B: 32 layers, 8 KV heads of 128 dims: 128 KiB per token in f16.
    assert estimate_kv_cache_bytes(_info(), 8192) == 2 * 32 * 8192 * 8 * 128 * 2
    assert estimate_kv_cache_bytes(_info(), 8192) == 8192 * 128 * 1024


def test_kv_cache_estimate_prefers_explicit_head_dimensions() -> None:
    info = _info(embedding_length=640, head_count=4, head_count_kv=1, key_length=256)
    assert estimate_kv_cache_bytes(info, 100) == 2 * 32 * 100 * 1 * (256 + 160)


def test_kv_cache_estimate_falls_back_when_fields_are_missing() -> None:
    bare = _info(block_count=0, embedding_length=0, head_count=0, head_count_kv=0)
    assert estimate_kv_cache_bytes(bare, 1000) == 2 * 32 * 1000 * 8 * (128 + 128)
    assert estimate_kv_cache_bytes(_info(head_count_kv=0), 10) == 2 * 32 * 10 * 32 * 256
    assert estimate_kv_cache_bytes(_info(), 0) == 0


def test_real_demo_model(demo_models_dir: Path) -> None:
    info = read_gguf_info(demo_models_dir / "gemma-3-270m-q4_k_m.gguf")
    assert info.architecture == "gemma3"
    assert info.block_count == 18
    assert info.quant == "Q4_K_M"
    assert info.size_bytes == 253_113_024
    assert 260_000_000 < info.parameter_count < 280_000_000
    assert (info.head_count, info.head_count_kv, info.key_length) == (4, 1, 256)
    assert info.context_length == 32768
    assert info.pooling_type == -1  # a generative model: embeddings only when asked for
    assert estimate_kv_cache_bytes(info, 4096) == 2 * 18 * 4096 * 1 * 512
