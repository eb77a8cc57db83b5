"""Benchmark: a forced split of the demo model through the mesh's RPC tunnel vs direct TCP.

Starts a host (`--split`) and a standby worker; once the host's llama-server runs split over
the QUIC tunnel, starts a second llama-server with the same argv connected to two fresh
rpc-servers directly over loopback TCP, and alternates identical streaming requests to both.
Prints generation tokens/s, time to first token, the tunnel/direct ratio, and the time from the
worker's start to the split being ready (model load through the tunnel included).
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mesh_llm.backend.build import ensure_binaries
from mesh_llm.backend.llama import build_rpc_server_argv
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.models.demo import install_demo_model
from tests.bench.bench_solo import stream_once
from tests.e2e.harness import MeshProcess, free_tcp_port, http_status, wait_until

ROUNDS = 3


def _split_argv(node: MeshProcess) -> list[str]:
    servers = [p for p in node.descendants() if p.name() == "llama-server"]
    return servers[0].cmdline() if len(servers) == 1 else []


def main() -> int:
    binaries = ensure_binaries(BackendConfig(), load_config().cache_dir)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-") as tmp:
        models = Path(tmp) / "models"
        install_demo_model(models, None)
        common = ["--models-dir", str(models), "--bin-dir", str(binaries.llama_server.parent)]
        host = MeshProcess(Path(tmp) / "host", ["--model", "gemma-3-270m", "--split", *common])
        nodes = [host.start()]
        direct: subprocess.Popen[bytes] | None = None
        rpcs: list[subprocess.Popen[bytes]] = []
        try:
            wait_until(lambda: bool(host.status().get("token")), 30, "token")
            worker = MeshProcess(Path(tmp) / "worker", ["--join", host.status()["token"], *common])
            nodes.append(worker.start())
            started = time.monotonic()
            wait_until(lambda: "--rpc" in _split_argv(host), 120, "split")
            host.wait_ready(240)
            load_s = time.monotonic() - started
            argv = _split_argv(host)
            tunnel_port = int(argv[argv.index("--port") + 1])
            # rpc-server serves one client at a time: the direct run gets its own pair.
            assert binaries.rpc_server is not None
            rpc_ports = [free_tcp_port(), free_tcp_port()]
            for port in rpc_ports:
                rpc_argv = build_rpc_server_argv(binaries.rpc_server, port)
                rpcs.append(
                    subprocess.Popen(rpc_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                )
            direct_rpc = ",".join(f"127.0.0.1:{port}" for port in rpc_ports)
            direct_port = free_tcp_port()
            direct_argv = [*argv]
            direct_argv[direct_argv.index("--rpc") + 1] = direct_rpc
            direct_argv[direct_argv.index("--port") + 1] = str(direct_port)
            direct = subprocess.Popen(
                direct_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            wait_until(
                lambda: http_status(f"http://127.0.0.1:{direct_port}/health") == 200, 240, "direct"
            )
            stream_once(tunnel_port)
            stream_once(direct_port)
            results: dict[str, list[tuple[float, float, int]]] = {"tunnel": [], "direct": []}
            for _ in range(ROUNDS):
                results["tunnel"].append(stream_once(tunnel_port))
                results["direct"].append(stream_once(direct_port))
        finally:
            for child in [*([direct] if direct is not None else []), *rpcs]:
                child.terminate()
                child.wait(10)
            for node in nodes:
                node.stop()
    tps = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    ttft = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    print(
        f"forced split of the demo model (tensor split {argv[argv.index('--tensor-split') + 1]}):"
    )
    for key in ("direct", "tunnel"):
        print(f"  {key:6s}  {tps[key]:6.1f} tokens/s   TTFT {ttft[key] * 1000:7.1f} ms")
    print(f"  tunnel/direct tokens/s ratio: {tps['tunnel'] / tps['direct']:.3f} (QUIC lane)")
    print(f"  worker join → split ready (incl. model load through the tunnel): {load_s:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
