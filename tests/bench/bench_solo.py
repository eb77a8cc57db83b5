"""Benchmark: the demo model through the mesh-llm API vs direct to its llama-server, same run.

Starts one real node (`mesh-llm --model gemma-3-270m`) and two passive clients joined to it, then
alternates identical streaming requests (fixed prompt, temperature 0, `ignore_eos`, fixed token
count) sent directly to the node's llama-server, through the node's API (local route) and
through a client's API (remote route: one hop over the fast lane) and through a second client
whose API requests stay on QUIC streams (`MESH_LLM_API_FAST_LANE=0`), and prints medians and
ratios: generation tokens/s (client-side, after the first token) and time to first token. Legs
run in a shuffled order each round (fixed seed). Run with `just bench`.
"""

from __future__ import annotations

import http.client
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from mesh_llm.backend.build import ensure_binaries
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.models.demo import install_demo_model
from tests.e2e.harness import MeshProcess, wait_until

ROUNDS = 20
MAX_TOKENS = 128
BODY = {
    "model": "gemma-3-270m-q4_k_m",
    "messages": [{"role": "user", "content": "Tell me a long story about the sea."}],
    "max_tokens": MAX_TOKENS,
    "temperature": 0,
    "ignore_eos": True,
    "stream": True,
}


def stream_once(port: int) -> tuple[float, float, int]:
    """(time to first token s, generation tokens/s after the first token, tokens)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(BODY), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    first = last = 0.0
    tokens = 0
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            tokens += 1
            last = time.perf_counter()
            if tokens == 1:
                first = last
    connection.close()
    return first - started, (tokens - 1) / (last - first), tokens


def main() -> int:
    config = load_config()
    binaries = ensure_binaries(BackendConfig(), config.cache_dir)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-") as tmp:
        models = Path(tmp) / "models"
        install_demo_model(models, None)
        args = ["--model", "gemma-3-270m", "--models-dir", str(models)]
        args += ["--bin-dir", str(binaries.llama_server.parent)]
        home = Path(tmp) / "home"
        threads = os.environ.get("BENCH_LLAMA_THREADS")
        if threads:  # e.g. 1 on a 2-core machine: leaves a core to the relaying processes
            home.mkdir()
            (home / "config.toml").write_text(f"[backend]\nthreads = {int(threads)}\n")
        node = MeshProcess(home, args).start()
        clients: list[MeshProcess] = []
        try:
            node.wait_ready()
            wait_until(lambda: bool(node.status().get("token")), 30, "token")
            join = ["--client", "--join", node.status()["token"]]
            fast = MeshProcess(Path(tmp) / "client", join)
            quic = MeshProcess(Path(tmp) / "client-quic", join, env={"MESH_LLM_API_FAST_LANE": "0"})
            for client in (fast, quic):
                clients.append(client)
                client.start().wait_ready()
            ports = {
                "direct": node.llama_server_port(),
                "local": node.port,
                "remote": fast.port,
                "quic": quic.port,
            }
            for port in ports.values():
                stream_once(port)  # warm-up (and the clients' on-demand links)
            results: dict[str, list[tuple[float, float, int]]] = {key: [] for key in ports}
            order = list(ports)
            shuffle = random.Random(0).shuffle
            for _ in range(ROUNDS):
                shuffle(order)  # the leg after another waits on that one's slot release
                for key in order:
                    results[key].append(stream_once(ports[key]))
            lanes = fast.status()["api_lanes"]
            assert lanes["quic"] == 0 and lanes["fast"] > ROUNDS, lanes
        finally:
            for client in clients:
                client.stop()
            node.stop()
    report(results)
    return 0


def report(results: dict[str, list[tuple[float, float, int]]]) -> None:
    ttft = {k: statistics.median(r[0] for r in v) for k, v in results.items()}
    tps = {k: statistics.median(r[1] for r in v) for k, v in results.items()}
    print(f"demo model, {ROUNDS} rounds of {MAX_TOKENS} tokens, streaming, medians:")
    for key in results:
        print(f"  {key:6s}  {tps[key]:6.1f} tokens/s   TTFT {ttft[key] * 1000:7.1f} ms")
    names = {"local": "local", "remote": "remote (fast lane)", "quic": "remote (QUIC)"}
    for key, name in names.items():
        print(
            f"  {name} route: {tps[key] / tps['direct']:.3f} of direct tokens/s, "
            f"TTFT {(ttft[key] - ttft['direct']) * 1000:+.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
