"""Benchmark: the demo model through the mesh-llm API vs direct to its llama-server, same run.

Starts one real node (`mesh-llm --model gemma-3-270m`) and two passive clients joined to it, then
alternates identical streaming requests (fixed prompt, temperature 0, `ignore_eos`, fixed token
count) sent directly to the node's llama-server, through the node's API (local route) and
through a client's API (remote route: one hop over the fast lane) and through a second client
whose API requests stay on QUIC streams (`MESH_LLM_API_FAST_LANE=0`), and prints medians and
ratios: generation tokens/s (client-side, after the first token), time to first token, and the
CPU time the mesh-llm processes (not their llama-server) spent per token on each leg. Legs run in
a shuffled order each round (fixed seed). `measure` is what `just bench` (tests/bench/run.py)
puts in its table; `python -m tests.bench.bench_solo` prints this benchmark alone.
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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import psutil

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


def stream_once(port: int, max_tokens: int = MAX_TOKENS) -> tuple[float, float, int]:
    """(time to first token s, generation tokens/s after the first token, tokens)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    started = time.perf_counter()
    body = {**BODY, "max_tokens": max_tokens}
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
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


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    tokens_per_s: float
    tokens: int
    cpu_s: float
    """CPU time (user + system) of the three mesh-llm processes during the request."""


def _cpu_s(processes: Sequence[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        times = process.cpu_times()
        total += times.user + times.system
    return total


def measure(rounds: int = ROUNDS, max_tokens: int = MAX_TOKENS) -> dict[str, list[Sample]]:
    """Per leg (direct, local, remote, quic), one sample per round, legs shuffled each round."""
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
            meshes = [psutil.Process(p.proc.pid) for p in (node, fast, quic) if p.proc]
            for port in ports.values():
                stream_once(port, max_tokens)  # warm-up (and the clients' on-demand links)
            results: dict[str, list[Sample]] = {key: [] for key in ports}
            order = list(ports)
            shuffle = random.Random(0).shuffle
            for _ in range(rounds):
                shuffle(order)  # the leg after another waits on that one's slot release
                for key in order:
                    before = _cpu_s(meshes)
                    ttft, tps, tokens = stream_once(ports[key], max_tokens)
                    results[key].append(Sample(ttft, tps, tokens, _cpu_s(meshes) - before))
            lanes = fast.status()["api_lanes"]
            assert lanes["quic"] == 0 and lanes["fast"] > rounds, lanes
        finally:
            for client in clients:
                client.stop()
            node.stop()
    return results


def main() -> int:
    report(measure())
    return 0


def report(results: dict[str, list[Sample]]) -> None:
    ttft = {k: statistics.median(r.ttft_s for r in v) for k, v in results.items()}
    tps = {k: statistics.median(r.tokens_per_s for r in v) for k, v in results.items()}
    cpu = {k: statistics.median(r.cpu_s / r.tokens for r in v) for k, v in results.items()}
    rounds = len(results["direct"])
    print(f"demo model, {rounds} rounds, streaming, medians:")
    for key in results:
        print(
            f"  {key:6s}  {tps[key]:6.1f} tokens/s   TTFT {ttft[key] * 1000:7.1f} ms   "
            f"mesh-llm CPU {cpu[key] * 1e6:6.0f} µs/token"
        )
    names = {"local": "local", "remote": "remote (fast lane)", "quic": "remote (QUIC)"}
    for key, name in names.items():
        print(
            f"  {name} route: {tps[key] / tps['direct']:.3f} of direct tokens/s, "
            f"TTFT {(ttft[key] - ttft['direct']) * 1000:+.1f} ms"
        )


if __name__ == "__main__":
    sys.exit(main())
