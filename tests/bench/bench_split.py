"""Benchmark: a split of the demo model over two rpc-servers, through each RPC lane, same run.

Every configuration gets its own rpc-servers (an rpc-server serves one client at a time) and its
own rpc tensor cache directory (`LLAMA_CACHE`), and its own llama-server; requests alternate
between configurations so that all see the same machine load. The tunnels are the project's
own (`net/tunnel.py`): a worker identity with a QUIC endpoint and a fast-lane server, a host
identity whose `RpcTunnelListener` relays llama-server's `--rpc` connection.

Configurations (host share = the layers a CPU host keeps; every rpc-server runs with -t = all
cores, as mesh-llm runs them, unless said otherwise):
  direct       --rpc worker,host-rpc over loopback TCP, tensor split 0.50,0.50: what placement.py
               does for a CPU host (its share on a local rpc-server listed last, which so holds
               the output layer)
  fast         the same, the worker reached through the fast lane (TCP + TLS 1.3)
  quic         the same, the worker reached through a QUIC RPC stream (0x02)
  direct-half  as direct, the host's rpc-server with its own default -t (half the cores)
  direct-ngl   --rpc worker only, -ngl = the worker's layers: the host's share stays on
               llama-server's own CPU device (no local rpc-server); llama.cpp offloads the
               LAST layers and the output layer, so the logits come back from the worker
  fast-ngl     the same through the fast lane
  quic-all     --rpc worker only through QUIC, -ngl 99: every layer AND the output layer on the
               worker (the earlier helper's setup), so every token's logits cross the tunnel
  direct-all   the same over direct TCP
(An `-ot` variant that kept the host's last layers and the output on llama-server's CPU was
measured in an earlier run and dropped: it moved 2.7 MB per token through the tunnel.)

Prints generation tokens/s, prompt processing tokens/s, time to first token (medians), the
ratio of each to direct, the bytes each tunnel carried per generated token, and for the fast
and QUIC lanes the model load time and bytes through the tunnel for a first load (empty rpc
tensor cache) and a second load (llama-server restarted: the cache holds the tensors, so only
hashes cross). Run: `python -m tests.bench.bench_split` (ROUNDS=5 in the environment for more);
the table of `just bench` runs `measure` with direct, fast and quic only.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mesh_llm.backend.build import Binaries, ensure_binaries
from mesh_llm.backend.llama import build_rpc_server_argv
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.core.types import NodeId
from mesh_llm.identity import NodeIdentity
from mesh_llm.models.demo import install_demo_model
from mesh_llm.models.gguf import read_gguf_info
from mesh_llm.net.fastlane import FastLaneServer
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.net.streams import QuicByteStream, TcpByteStream
from mesh_llm.net.transport import PeerTransport
from mesh_llm.net.tunnel import RpcTunnelListener, rpc_worker_handler
from mesh_llm.wire.messages import NodeRecord, RefuseCode, StreamType
from tests.bench.bench_solo import stream_once
from tests.e2e.harness import free_tcp_port, http_status

ROUNDS = int(os.environ.get("ROUNDS", "3"))
N_PREDICT = 64
PROMPT = "The history of the printing press in Europe. " * 40  # ~400 tokens
LOAD_TIMEOUT_S = 300.0
DIAL_TIMEOUT_S = 10.0
KEEPALIVE_S = 1.0
POLL_S = 0.05
CORES = os.cpu_count() or 1  # mesh-llm runs every rpc-server with -t = all cores


@dataclass
class Worker:
    """A worker node in miniature: rpc-server, QUIC endpoint and fast-lane server."""

    identity: NodeIdentity
    rpc_port: int
    quic: QuicEndpoint | None = None
    lane: FastLaneServer | None = None


@dataclass
class Config:
    name: str
    rpc: list[str]  # "worker" (maybe tunnelled) and/or "host" (a local rpc-server)
    lane: str  # direct | fast | quic
    ngl: str  # "99" or the worker's layer count
    tensor_split: str | None
    extra: tuple[str, ...] = ()  # more llama-server arguments
    host_threads: int | None = CORES  # -t of the host's rpc-server (None: rpc-server's default)
    llama_port: int = field(default_factory=free_tcp_port)
    listener: RpcTunnelListener | None = None
    argv: list[str] = field(default_factory=list)
    llama: subprocess.Popen[bytes] | None = None


class Bench:
    def __init__(
        self, binaries: Binaries, model: Path, tmp: Path, threads: int | None = None
    ) -> None:
        self.binaries, self.model, self.tmp = binaries, model, tmp
        self.threads = threads  # -t of every rpc-server instead of each config's own
        self.host = NodeIdentity.generate()
        self.children: list[subprocess.Popen[bytes]] = []
        self.endpoints: list[QuicEndpoint] = []
        self.pingers: list[asyncio.Task[None]] = []
        self.runs: list[asyncio.Task[None]] = []  # the run() of endpoints, servers, listeners

    def rpc_server(self, name: str, threads: int | None = CORES) -> int:
        assert self.binaries.rpc_server is not None
        port = free_tcp_port()
        threads = self.threads or threads
        env = {**os.environ, "LLAMA_CACHE": str(self.tmp / f"cache-{name}")}  # cold cache
        argv = build_rpc_server_argv(self.binaries.rpc_server, port, threads=threads)
        self.children.append(_spawn(argv, env))
        return port

    async def worker(self, name: str) -> Worker:
        worker = Worker(NodeIdentity.generate(), self.rpc_server(name))

        rpc = rpc_worker_handler(lambda: worker.rpc_port)

        async def streams(_c: QuicPeerConnection, kind: StreamType, s: QuicStream) -> None:
            if kind is StreamType.RPC:
                await rpc(QuicByteStream(s), self.host.node_id)
            else:
                s.reset(RefuseCode.UNKNOWN_STREAM)

        async def lane(
            peer: NodeId, _p: StreamType, r: asyncio.StreamReader, w: asyncio.StreamWriter
        ) -> None:
            await rpc(TcpByteStream(r, w), peer)

        worker.quic = await QuicEndpoint.bind(
            worker.identity, "127.0.0.1", 0, streams, lambda _c: None
        )
        worker.lane = await FastLaneServer.start(
            worker.identity,
            host="127.0.0.1",
            on_connection=lane,
            is_allowed=lambda node: node == self.host.node_id,
        )
        self.endpoints.append(worker.quic)
        self.runs += [
            asyncio.create_task(worker.quic.run()),
            asyncio.create_task(worker.lane.run()),
        ]
        return worker

    async def tunnel(self, worker: Worker, lane: str) -> RpcTunnelListener:
        async def refuse(_c: QuicPeerConnection, _k: StreamType, s: QuicStream) -> None:
            s.reset(RefuseCode.UNKNOWN_STREAM)

        assert worker.quic is not None and worker.lane is not None
        end = await QuicEndpoint.bind(self.host, "127.0.0.1", 0, refuse, lambda _c: None)
        self.endpoints.append(end)
        self.runs.append(asyncio.create_task(end.run()))
        quic = await end.dial("127.0.0.1", worker.quic.port, worker.identity.node_id, 10.0)
        self.pingers.append(asyncio.create_task(_keep_alive(quic)))
        record = NodeRecord(worker.identity.node_id, 1, fast_lane_port=worker.lane.port)
        dialer = PeerTransport(
            self.host,
            _Links(record, quic),
            fast_lane_purposes=frozenset() if lane == "quic" else frozenset({StreamType.RPC}),
            connect_timeout_s=10.0,
            fast_lane_retry_s=60.0,
        )
        listener = await RpcTunnelListener.start(dialer, worker.identity.node_id)
        self.runs.append(asyncio.create_task(listener.run()))
        return listener

    async def prepare(self, config: Config) -> None:
        endpoints = []
        for role in config.rpc:
            if role == "host":
                port = self.rpc_server(config.name + "-host", config.host_threads)
                endpoints.append(f"127.0.0.1:{port}")
            elif config.lane == "direct":
                endpoints.append(f"127.0.0.1:{self.rpc_server(config.name)}")
            else:
                config.listener = await self.tunnel(await self.worker(config.name), config.lane)
                endpoints.append(f"127.0.0.1:{config.listener.port}")
        argv = [str(self.binaries.llama_server), "-m", str(self.model), "--host", "127.0.0.1"]
        argv += ["--port", str(config.llama_port), "-ngl", config.ngl, "-c", "4096"]
        argv += ["--rpc", ",".join(endpoints)]
        if config.tensor_split:
            argv += ["--tensor-split", config.tensor_split]
        config.argv = [*argv, *config.extra]

    async def load(self, config: Config) -> tuple[float, int]:
        """Start llama-server; (seconds to /health 200, bytes sent host → worker meanwhile)."""
        await _wait_accepting(config)
        before = config.listener.counters.bytes_up if config.listener else 0
        started = time.monotonic()
        config.llama = _spawn(config.argv)
        url = f"http://127.0.0.1:{config.llama_port}/health"
        while await asyncio.to_thread(http_status, url) != 200:
            if time.monotonic() - started > LOAD_TIMEOUT_S or config.llama.poll() is not None:
                raise RuntimeError(f"{config.name}: llama-server not ready: {config.argv}")
            await asyncio.sleep(POLL_S)
        elapsed = time.monotonic() - started
        after = config.listener.counters.bytes_up if config.listener else 0
        return elapsed, after - before

    async def stop_llama(self, config: Config) -> None:
        assert config.llama is not None
        config.llama.terminate()
        await asyncio.to_thread(config.llama.wait, 30)
        if config.listener is not None:  # the session to the rpc-server must end first
            listener = config.listener
            await _until(lambda: listener.sessions == 0)

    async def close(self) -> None:
        for task in self.pingers:
            task.cancel()
        await asyncio.gather(*self.pingers, return_exceptions=True)
        for child in self.children:
            child.kill()
            child.wait()
        for task in reversed(self.runs):
            task.cancel()
        await asyncio.gather(*self.runs, return_exceptions=True)
        for endpoint in self.endpoints:
            endpoint.close()


class _Links:
    """The host's view of one worker for `PeerTransport`: its record and QUIC link."""

    def __init__(self, record: NodeRecord, connection: QuicPeerConnection) -> None:
        self.record = record
        self.connection = connection

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None:
        return self.connection

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        return self.connection

    def record_of(self, node_id: NodeId) -> NodeRecord | None:
        return self.record


def _spawn(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


async def _keep_alive(connection: QuicPeerConnection) -> None:
    while True:
        await connection.ping()
        await asyncio.sleep(KEEPALIVE_S)  # pacing, as the node's heartbeat does


async def _until(condition: object) -> None:
    assert callable(condition)
    deadline = time.monotonic() + 30
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out")
        await asyncio.sleep(POLL_S)


async def _wait_accepting(config: Config) -> None:
    """Every rpc-server of the argv accepts (through a tunnel the worker's one is behind)."""
    import socket

    def accepts(port: int) -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    ports = [
        int(e.rsplit(":", 1)[1]) for e in config.argv[config.argv.index("--rpc") + 1].split(",")
    ]
    tunnel = config.listener.port if config.listener else None
    await _until(lambda: all(accepts(p) for p in ports if p != tunnel))


def _complete(port: int, prompt: str, n_predict: int) -> dict[str, float]:
    body = {"prompt": prompt, "n_predict": n_predict, "ignore_eos": True, "cache_prompt": False}
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion",
        json.dumps(body).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=300) as response:
        timings: dict[str, float] = json.loads(response.read())["timings"]
        return timings


def _tunnel_bytes(config: Config) -> int:
    counters = config.listener.counters if config.listener else None
    return counters.bytes_up + counters.bytes_down if counters else 0


def _measure(config: Config) -> tuple[float, float, float, float]:
    """(generation tokens/s, prompt processing tokens/s, TTFT s, tunnel bytes per generated
    token) of one round."""
    before = _tunnel_bytes(config)
    generation = _complete(config.llama_port, "Hello", N_PREDICT)
    per_token = (_tunnel_bytes(config) - before) / generation["predicted_n"]
    prompt = _complete(config.llama_port, PROMPT, 1)["prompt_per_second"]
    ttft = stream_once(config.llama_port, 2)[0]  # the first token is all TTFT needs
    return generation["predicted_per_second"], prompt, ttft, per_token


def _configs(layers: int) -> list[Config]:
    worker_layers = str(layers // 2)  # the worker's half, as tensor split 0.50,0.50 gives it
    return [
        Config("direct", ["worker", "host"], "direct", "99", "0.50,0.50"),
        Config("fast", ["worker", "host"], "fast", "99", "0.50,0.50"),
        Config("quic", ["worker", "host"], "quic", "99", "0.50,0.50"),
        Config("direct-half", ["worker", "host"], "direct", "99", "0.50,0.50", (), None),
        Config("direct-ngl", ["worker"], "direct", worker_layers, None),
        Config("fast-ngl", ["worker"], "fast", worker_layers, None),
        Config("quic-all", ["worker"], "quic", "99", None),
        Config("direct-all", ["worker"], "direct", "99", None),
    ]


Results = dict[str, list[tuple[float, float, float, float]]]


async def run(
    binaries: Binaries,
    model: Path,
    tmp: Path,
    rounds: int = ROUNDS,
    names: tuple[str, ...] | None = None,
    threads: int | None = None,
) -> Results:
    """Every configuration (or those `names`), `rounds` interleaved rounds of `_measure`;
    `threads`: -t of every rpc-server (default: each configuration's own)."""
    layers = read_gguf_info(model).block_count
    configs = [c for c in _configs(layers) if names is None or c.name in names]
    bench = Bench(binaries, model, tmp, threads)
    loads: dict[str, list[tuple[float, int]]] = {}
    try:
        for config in configs:
            await bench.prepare(config)
            loads[config.name] = [await bench.load(config)]
        for config in configs:  # second load: the rpc-servers' tensor caches are warm
            if config.name in ("direct", "fast", "quic") and names is None:
                await bench.stop_llama(config)
                loads[config.name].append(await bench.load(config))
        for config in configs:
            await asyncio.to_thread(_measure, config)  # warm-up
        results: dict[str, list[tuple[float, float, float, float]]] = {c.name: [] for c in configs}
        for _ in range(rounds):
            for config in configs:
                results[config.name].append(await asyncio.to_thread(_measure, config))
        if names is None:
            _report(configs, results, loads, layers)
        return results
    finally:
        await bench.close()
        for config in configs:
            if config.llama is not None:
                config.llama.kill()
                config.llama.wait()


def _report(
    configs: list[Config],
    results: dict[str, list[tuple[float, float, float, float]]],
    loads: dict[str, list[tuple[float, int]]],
    layers: int,
) -> None:
    direct = [statistics.median(r[i] for r in results["direct"]) for i in range(3)]
    rounds = len(results["direct"])
    print(f"\nsplit of the demo model ({layers} layers), medians of {rounds} rounds, same run")
    print(
        f"{'config':>11} {'gen tok/s':>10} {'ratio':>6} {'pp tok/s':>9} {'ratio':>6} "
        f"{'TTFT ms':>8} {'tunnel B/token':>15}"
    )
    for config in configs:
        gen, pp, ttft, per = (
            statistics.median(r[i] for r in results[config.name]) for i in range(4)
        )
        per_token = f"{per:,.0f}" if config.listener is not None else "-"
        print(
            f"{config.name:>11} {gen:10.1f} {gen / direct[0]:6.2f} {pp:9.1f} "
            f"{pp / direct[1]:6.2f} {ttft * 1000:8.1f} {per_token:>15}"
        )
    print("model load (llama-server start → /health 200) and bytes host → worker:")
    for name in ("direct", "fast", "quic"):
        (first_s, first_b), (second_s, second_b) = loads[name]
        print(
            f"{name:>11}: first {first_s:5.1f} s {first_b / 1e6:7.1f} MB, "
            f"second (tensor cache) {second_s:5.1f} s {second_b / 1e6:7.2f} MB"
        )


def measure(
    rounds: int = ROUNDS, names: tuple[str, ...] | None = None, threads: int | None = None
) -> Results:
    """Per configuration, one (gen tok/s, pp tok/s, TTFT s, tunnel B/token) per round.

    `threads=1` on a small shared machine: two rpc-servers whose -t 2 threads spin on a
    barrier slow down a hundredfold when other work holds the cores."""
    binaries = ensure_binaries(BackendConfig(), load_config().cache_dir)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-") as tmp:
        model = install_demo_model(Path(tmp) / "models", None)
        return asyncio.run(run(binaries, model, Path(tmp), rounds, names, threads))


def main() -> int:
    measure()
    return 0


if __name__ == "__main__":
    sys.exit(main())
