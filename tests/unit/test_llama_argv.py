"""Pure argv builders for llama-server and rpc-server."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh_llm.backend.llama import build_llama_server_argv, build_rpc_server_argv

SERVER = Path("/opt/bin/llama-server")
RPC = Path("/opt/bin/ggml-rpc-server")
MODEL = Path("/models/qwen.gguf")


def test_solo_argv_exact() -> None:
    argv = build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=4096)
    assert argv == [
        "/opt/bin/llama-server",
        "-m",
        "/models/qwen.gguf",
        "--host",
        "127.0.0.1",
        "--port",
        "8081",
        "-ngl",
        "99",
        "-c",
        "4096",
        "--metrics",
    ]


def test_split_with_rpc_and_tensor_split() -> None:
    argv = build_llama_server_argv(
        SERVER,
        MODEL,
        8081,
        ctx_size=2048,
        rpc_endpoints=["127.0.0.1:50001", "127.0.0.1:50002"],
        tensor_split=[2 / 3, 1 / 3],
    )
    assert argv[argv.index("--rpc") + 1] == "127.0.0.1:50001,127.0.0.1:50002"
    assert argv[argv.index("--tensor-split") + 1] == "0.67,0.33"
    assert argv.count("--rpc") == 1
    assert argv[argv.index("-c") + 1] == "2048"


def test_options_alias_threads_and_gpu_layers() -> None:
    argv = build_llama_server_argv(
        SERVER, MODEL, 8081, ctx_size=512, n_gpu_layers=0, threads=3, alias="qwen"
    )
    assert argv[argv.index("-ngl") + 1] == "0"
    assert argv[argv.index("-t") + 1] == "3"
    assert argv[argv.index("--alias") + 1] == "qwen"


def test_no_optional_flags_by_default() -> None:
    argv = build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=512)
    for flag in ("--rpc", "--tensor-split", "-md", "-ngld", "-t", "--alias"):
        assert flag not in argv


def test_draft_model_adds_md_and_ngld() -> None:
    draft = Path("/models/draft.gguf")
    argv = build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=512, draft_model=draft)
    index = argv.index("-md")
    assert argv[index : index + 4] == ["-md", "/models/draft.gguf", "-ngld", "99"]


def test_extra_args_are_appended_last() -> None:
    argv = build_llama_server_argv(
        SERVER,
        MODEL,
        8081,
        ctx_size=512,
        draft_model=Path("/d.gguf"),
        extra_args=("--flash-attn", "on"),
    )
    assert argv[-2:] == ["--flash-attn", "on"]


@pytest.mark.parametrize("port", [0, -1, 65536, 100000])
def test_bad_port(port: int) -> None:
    with pytest.raises(ValueError, match="port"):
        build_llama_server_argv(SERVER, MODEL, port, ctx_size=512)
    with pytest.raises(ValueError, match="port"):
        build_rpc_server_argv(RPC, port)


@pytest.mark.parametrize("ctx_size", [0, -4096])
def test_bad_ctx_size(ctx_size: int) -> None:
    with pytest.raises(ValueError, match="ctx_size"):
        build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=ctx_size)


@pytest.mark.parametrize("split", [[0.5, -0.5], [0.0, 0.0], [-1.0]])
def test_bad_tensor_split(split: list[float]) -> None:
    with pytest.raises(ValueError, match="tensor split"):
        build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=512, tensor_split=split)


@pytest.mark.parametrize("port", [1, 65535])
def test_port_bounds_are_valid(port: int) -> None:
    argv = build_llama_server_argv(SERVER, MODEL, port, ctx_size=512)
    assert argv[argv.index("--port") + 1] == str(port)


def test_rpc_server_argv_binds_loopback_with_cache() -> None:
    assert build_rpc_server_argv(RPC, 50052) == [
        "/opt/bin/ggml-rpc-server",
        "-H",
        "127.0.0.1",
        "-p",
        "50052",
        "-c",
    ]


def test_rpc_server_argv_options() -> None:
    argv = build_rpc_server_argv(RPC, 50052, device="CUDA0", threads=4, cache=False)
    assert "-c" not in argv
    assert argv[argv.index("-d") + 1] == "CUDA0"
    assert argv[argv.index("-t") + 1] == "4"
    assert argv[1:3] == ["-H", "127.0.0.1"]


def test_embeddings_with_pooling() -> None:
    argv = build_llama_server_argv(
        SERVER, MODEL, 8081, ctx_size=512, embeddings=True, pooling="mean"
    )
    assert argv[argv.index("--embeddings") + 1 :][:2] == ["--pooling", "mean"]
    plain = build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=512, pooling="mean")
    assert "--embeddings" not in plain and "--pooling" not in plain


def test_reranking_needs_no_other_flag() -> None:
    argv = build_llama_server_argv(
        SERVER, MODEL, 8081, ctx_size=512, embeddings=True, pooling="cls", reranking=True
    )
    assert "--reranking" in argv
    assert "--embeddings" not in argv and "--pooling" not in argv


def test_bad_pooling() -> None:
    with pytest.raises(ValueError, match="pooling"):
        build_llama_server_argv(SERVER, MODEL, 8081, ctx_size=512, embeddings=True, pooling="max")
