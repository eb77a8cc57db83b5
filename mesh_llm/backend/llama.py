"""Pure argv builders for llama.cpp's `llama-server` and `rpc-server`.

Inputs are paths, ports and plain options; outputs are argv lists. Both programs always bind
127.0.0.1: nothing of llama.cpp is exposed to the network. No I/O here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

LOOPBACK = "127.0.0.1"
ALL_LAYERS_ON_DEVICE = 99
POOLINGS = ("none", "mean", "cls", "last")


def build_llama_server_argv(
    binary: Path,
    model: Path,
    port: int,
    *,
    ctx_size: int,
    n_gpu_layers: int = ALL_LAYERS_ON_DEVICE,
    rpc_endpoints: Sequence[str] = (),
    tensor_split: Sequence[float] = (),
    draft_model: Path | None = None,
    threads: int | None = None,
    alias: str | None = None,
    embeddings: bool = False,
    pooling: str | None = None,
    reranking: bool = False,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """argv for `llama-server` serving `model` on 127.0.0.1:`port` (ctx_size in tokens).

    `tensor_split` ratios are written with two decimals in llama-server's device order.
    `embeddings` enables `/v1/embeddings` with `pooling` (none, mean, cls, last; None: the
    model's default); `reranking` enables `/v1/rerank` (rank pooling, implies embeddings).
    Raises `ValueError` for an invalid port, context size, split or pooling.
    """
    _check_port(port)
    if ctx_size <= 0:
        raise ValueError(f"ctx_size must be positive, got {ctx_size}")
    argv = [
        str(binary),
        "-m",
        str(model),
        "--host",
        LOOPBACK,
        "--port",
        str(port),
        "-ngl",
        str(n_gpu_layers),
        "-c",
        str(ctx_size),
        "--metrics",
    ]
    if alias:
        argv += ["--alias", alias]
    if threads is not None:
        argv += ["-t", str(threads)]
    if rpc_endpoints:
        argv += ["--rpc", ",".join(rpc_endpoints)]
    if tensor_split:
        if any(r < 0 for r in tensor_split) or sum(tensor_split) <= 0:
            raise ValueError(f"bad tensor split {list(tensor_split)}")
        argv += ["--tensor-split", ",".join(f"{r:.2f}" for r in tensor_split)]
    if reranking:
        argv.append("--reranking")
    elif embeddings:
        argv.append("--embeddings")
        if pooling is not None:
            if pooling not in POOLINGS:
                raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
            argv += ["--pooling", pooling]
    if draft_model is not None:
        argv += ["-md", str(draft_model), "-ngld", str(ALL_LAYERS_ON_DEVICE)]
    argv += list(extra_args)
    return argv


def build_rpc_server_argv(
    binary: Path,
    port: int,
    *,
    device: str | None = None,
    threads: int | None = None,
    cache: bool = True,
) -> list[str]:
    """argv for `rpc-server` on 127.0.0.1:`port`, tensor cache on by default."""
    _check_port(port)
    argv = [str(binary), "-H", LOOPBACK, "-p", str(port)]
    if cache:
        argv.append("-c")
    if device is not None:
        argv += ["-d", device]
    if threads is not None:
        argv += ["-t", str(threads)]
    return argv


def _check_port(port: int) -> None:
    if not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port}")
