"""The RPC tunnel on loopback: fast-lane authentication, relaying over the fast lane and over
QUIC, fallback, session end, and a real llama-server split through it (e2e marker)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import tempfile
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from mesh_llm.backend.build import Binaries
from mesh_llm.backend.llama import build_rpc_server_argv
from mesh_llm.core.types import NodeId
from mesh_llm.errors import ProtocolError
from mesh_llm.identity import NodeIdentity
from mesh_llm.models.demo import install_demo_model
from mesh_llm.net.fastlane import ConnectionHandler, FastLaneServer, fast_lane_connect
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.net.streams import QuicByteStream, TcpByteStream
from mesh_llm.net.transport import Handler, PeerTransport, fast_lane_addr_of
from mesh_llm.net.tunnel import RpcTunnelListener, RpcTunnels, rpc_worker_handler
from mesh_llm.wire.messages import NodeRecord, RefuseCode, StreamType
from tests.fakes.waiting import start, stop, wait_until

TIMEOUT_S = 20.0
ROUNDS = 3
N_PREDICT = 64
QUIT = b"QUIT"


@dataclass
class EchoServer:
    """Echoes every byte; closes a connection that sends `QUIT`; records ended connections."""

    server: asyncio.Server | None = None
    ended: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def port(self) -> int:
        assert self.server is not None
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while (data := await reader.read(256 * 1024)) and QUIT not in data:
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            self.ended += 1


@dataclass
class Nodes:
    host: NodeIdentity
    worker: NodeIdentity
    echo: EchoServer
    lane: FastLaneServer
    quic: QuicPeerConnection  # the host's QUIC connection to the worker


@pytest.fixture
async def echo() -> AsyncIterator[EchoServer]:
    echo = EchoServer()
    echo.server = await asyncio.start_server(echo.handle, "127.0.0.1", 0)
    try:
        yield echo
    finally:
        echo.server.close()


@pytest.fixture
async def nodes(echo: EchoServer) -> AsyncIterator[Nodes]:
    """A host and a worker whose RPC sessions (fast lane or QUIC) reach the echo server."""
    host, worker = NodeIdentity.generate(), NodeIdentity.generate()

    rpc = rpc_worker_handler(lambda: echo.port)

    async def worker_streams(_c: QuicPeerConnection, kind: StreamType, s: QuicStream) -> None:
        if kind is StreamType.RPC:
            await rpc(QuicByteStream(s), host.node_id)
        else:
            s.reset(RefuseCode.UNKNOWN_STREAM)

    async def host_streams(_c: QuicPeerConnection, _k: StreamType, s: QuicStream) -> None:
        s.reset(RefuseCode.UNKNOWN_STREAM)

    worker_end = await QuicEndpoint.bind(worker, "127.0.0.1", 0, worker_streams, lambda _c: None)
    host_end = await QuicEndpoint.bind(host, "127.0.0.1", 0, host_streams, lambda _c: None)
    lane = await FastLaneServer.start(
        worker,
        host="127.0.0.1",
        on_connection=rpc_lane(rpc),
        is_allowed=lambda node: node == host.node_id,
    )
    tasks = [start(worker_end.run()), start(host_end.run()), start(lane.run())]
    try:
        quic = await host_end.dial("127.0.0.1", worker_end.port, worker.node_id, TIMEOUT_S)
        yield Nodes(host, worker, echo, lane, quic)
    finally:
        for task in tasks:
            await stop(task)
        host_end.close()
        worker_end.close()


def rpc_lane(handler: Handler) -> ConnectionHandler:
    """A fast-lane server's `on_connection` that serves RPC connections with `handler`."""

    async def on_connection(
        peer: NodeId, purpose: StreamType, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        await handler(TcpByteStream(r, w), peer)

    return on_connection


class Links:
    """The host's view of the worker for `PeerTransport`: its record and its QUIC link."""

    def __init__(self, record: NodeRecord, connection: QuicPeerConnection | None) -> None:
        self.record = record
        self.connection = connection

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None:
        return self.connection if node_id == self.record.node_id else None

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        raise AssertionError("RPC streams do not dial on demand")

    def record_of(self, node_id: NodeId) -> NodeRecord | None:
        return self.record if node_id == self.record.node_id else None


def transport(host: NodeIdentity, links: Links, *, force_quic: bool = False) -> PeerTransport:
    return PeerTransport(
        host,
        links,
        fast_lane_purposes=frozenset() if force_quic else frozenset({StreamType.RPC}),
        connect_timeout_s=5.0,
        fast_lane_retry_s=60.0,
    )


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port  # nothing listens there any more


async def _listener(nodes: Nodes, lane: str) -> tuple[RpcTunnelListener, asyncio.Task[None]]:
    """A listener for the worker, running; the fast lane at the QUIC link's address."""
    port = nodes.lane.port if lane != "closed-port" else _closed_port()
    record = NodeRecord(nodes.worker.node_id, 1, fast_lane_port=port)
    dialer = transport(nodes.host, Links(record, nodes.quic), force_quic=lane == "forced-quic")
    listener = await RpcTunnelListener.start(dialer, nodes.worker.node_id)
    return listener, start(listener.run())


async def _echo_round_trip(port: int, payload: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:

        async def send() -> None:
            for start in range(0, len(payload), 64 * 1024):
                writer.write(payload[start : start + 64 * 1024])
                await writer.drain()

        sender = asyncio.ensure_future(send())
        received = await reader.readexactly(len(payload))
        await sender
        return received
    finally:
        writer.close()


# -- fast-lane authentication -----------------------------------------------------------------


async def _server(
    identity: NodeIdentity, is_allowed: Callable[[NodeId], bool], seen: list[NodeId]
) -> FastLaneServer:
    async def on_connection(
        peer: NodeId, purpose: StreamType, r: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> None:
        seen.append(peer)
        w.write(bytes([purpose]) + await r.readexactly(5))
        await w.drain()

    server = await FastLaneServer.start(
        identity, host="127.0.0.1", on_connection=on_connection, is_allowed=is_allowed
    )
    RUNNING[server] = start(server.run())
    return server


RUNNING: dict[FastLaneServer, asyncio.Task[None]] = {}  # the run() of each test server


async def _close(server: FastLaneServer) -> None:
    await stop(RUNNING.pop(server))


async def test_fast_lane_authenticates_both_keys() -> None:
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    seen: list[NodeId] = []
    server = await _server(server_id, lambda node: node == client_id.node_id, seen)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer, peer = await fast_lane_connect(
                client_id, "127.0.0.1", server.port, server_id.node_id, TIMEOUT_S
            )
            writer.write(b"hello")
            assert await reader.readexactly(6) == bytes([StreamType.RPC]) + b"hello"
            writer.close()
    finally:
        await _close(server)
    assert peer == server_id.node_id
    assert seen == [client_id.node_id]


async def test_client_expecting_another_node_aborts() -> None:
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    seen: list[NodeId] = []
    server = await _server(server_id, lambda _node: True, seen)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(ProtocolError, match="expected") as refused:
                await fast_lane_connect(
                    client_id, "127.0.0.1", server.port, NodeIdentity.generate().node_id, 5.0
                )
    finally:
        await _close(server)
    assert refused.value.code == RefuseCode.KEY_MISMATCH
    assert seen == []


async def test_server_refuses_a_client_it_does_not_allow() -> None:
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    seen: list[NodeId] = []
    asked: list[NodeId] = []

    def refuse(node: NodeId) -> bool:
        asked.append(node)
        return False

    server = await _server(server_id, refuse, seen)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            with pytest.raises(ProtocolError, match="refused us") as refused:
                await fast_lane_connect(client_id, "127.0.0.1", server.port, server_id.node_id, 5.0)
    finally:
        await _close(server)
    assert refused.value.code == RefuseCode.KEY_MISMATCH
    assert asked == [client_id.node_id]  # the server saw the client's proven key
    assert seen == []


async def test_garbage_on_the_fast_lane_port_is_dropped_and_it_keeps_serving() -> None:
    server_id, client_id = NodeIdentity.generate(), NodeIdentity.generate()
    seen: list[NodeId] = []
    server = await _server(server_id, lambda _node: True, seen)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.write(os.urandom(2000))  # not TLS at all
            assert await reader.read() == b""
            writer.close()
            await writer.wait_closed()
            _, writer, _ = await fast_lane_connect(
                client_id, "127.0.0.1", server.port, server_id.node_id, 5.0
            )
            writer.write(b"hello")
            await wait_until(lambda: seen == [client_id.node_id], "the good client to be served")
            writer.close()
    finally:
        await _close(server)


# -- relaying -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lane", "expected_lane", "reason", "size"),
    [
        ("fast", "fast", "", 8 * 1024 * 1024),
        ("closed-port", "quic", "fast lane to 127.0.0.1:", 1024 * 1024),
        ("forced-quic", "quic", "QUIC forced", 1024 * 1024),
    ],
)
async def test_relay_random_bytes_both_ways(
    nodes: Nodes, lane: str, expected_lane: str, reason: str, size: int
) -> None:
    listener, serving = await _listener(nodes, lane)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            payloads = [os.urandom(size), os.urandom(1000)]
            for payload in payloads:  # two sessions: the second reuses the chosen lane
                assert await _echo_round_trip(listener.port, payload) == payload
            await wait_until(lambda: nodes.echo.ended == 2, "both sessions ended at the echo")
    finally:
        await stop(serving)
    total = sum(len(p) for p in payloads)
    assert listener.lane == expected_lane
    assert listener.counters.reason.startswith(reason)
    assert listener.counters.connections == 2
    assert listener.counters.bytes_up == total
    assert listener.counters.bytes_down == total


@pytest.mark.parametrize("lane", ["fast", "forced-quic"])
async def test_either_side_closing_ends_both(nodes: Nodes, lane: str) -> None:
    listener, serving = await _listener(nodes, lane)
    try:
        async with asyncio.timeout(TIMEOUT_S):
            # The host's llama-server side closes: the worker's rpc-server side sees the end.
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.close()
            await wait_until(lambda: nodes.echo.ended == 1, "the worker side to end")
            # The worker's rpc-server side closes: the host's side reads end of stream.
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            writer.write(b"ping")
            assert await reader.readexactly(4) == b"ping"
            writer.write(QUIT)
            assert await reader.read() == b""
            writer.close()
            await wait_until(lambda: listener.sessions == 0, "the host side to end")
    finally:
        await stop(serving)
    assert nodes.echo.ended == 2


async def test_no_lane_closes_the_session(nodes: Nodes) -> None:
    record = NodeRecord(
        nodes.worker.node_id, 1, addrs=("127.0.0.1:9",), fast_lane_port=_closed_port()
    )
    dialer = transport(nodes.host, Links(record, None))  # no QUIC link, the fast lane closed
    listener = await RpcTunnelListener.start(dialer, nodes.worker.node_id)
    serving = start(listener.run())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            reader, writer = await asyncio.open_connection("127.0.0.1", listener.port)
            assert await reader.read() == b""
            writer.close()
    finally:
        await stop(serving)
    assert listener.counters.connections == 0
    assert listener.lane == "none"
    assert listener.counters.reason.startswith("no lane")


# -- real llama.cpp ---------------------------------------------------------------------------


def _free_port() -> int:
    return _closed_port()


def _health(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            status: int = response.status
            return status
    except OSError:
        return 0


def _complete(port: int, n_predict: int) -> dict[str, object]:
    body = json.dumps({"prompt": "Hello", "n_predict": n_predict, "ignore_eos": True}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/completion", body, {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=120) as response:
        answer: dict[str, object] = json.loads(response.read())
        return answer


def _tokens_per_s(split: Split) -> float:
    timings = _complete(split.llama_port, N_PREDICT)["timings"]
    assert isinstance(timings, dict)
    return float(timings["predicted_per_second"])


@dataclass
class Split:
    """One rpc-server and one llama-server offloading all layers to it through `rpc_port`."""

    rpc_port: int
    llama_port: int
    children: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _start_rpc_server(binaries: Binaries, split: Split) -> None:
    assert binaries.rpc_server is not None
    # No tensor cache: model weights must cross the tunnel every time.
    argv = build_rpc_server_argv(binaries.rpc_server, split.rpc_port, cache=False)
    split.children.append(
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )


def _start_llama_server(binaries: Binaries, model: Path, split: Split, rpc: int) -> None:
    argv = [str(binaries.llama_server), "-m", str(model), "--rpc", f"127.0.0.1:{rpc}"]
    argv += ["-ngl", "99", "--port", str(split.llama_port), "--host", "127.0.0.1"]
    split.children.append(
        subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    )


async def _start_split(binaries: Binaries, model: Path, split: Split, rpc: int) -> None:
    """The rpc-server, then (once it accepts) llama-server pointed at `rpc`."""
    _start_rpc_server(binaries, split)
    await wait_until(lambda: _accepts(split.rpc_port), f"rpc-server on {split.rpc_port}")
    _start_llama_server(binaries, model, split, rpc)


def _accepts(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


async def _wait_healthy(split: Split, timeout_s: float) -> float:
    """Seconds until llama-server answers /health 200 (polled off the loop: relays run on it)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    while await asyncio.to_thread(_health, split.llama_port) != 200:
        if loop.time() - started > timeout_s:
            pytest.fail(f"llama-server on {split.llama_port} not healthy after {timeout_s} s")
        await asyncio.sleep(0.1)  # poll interval of a condition with a deadline
    return loop.time() - started


async def _keep_alive(connection: QuicPeerConnection) -> None:
    while True:
        await connection.ping()
        await asyncio.sleep(1.0)  # a pacing interval, not a wait for a condition


@pytest.mark.e2e
@pytest.mark.timeout(600)
async def test_real_llama_server_through_the_tunnel(llama_binaries: Binaries) -> None:
    worker, host = NodeIdentity.generate(), NodeIdentity.generate()
    names = ("fast lane", "direct", "quic lane")
    splits = {name: Split(_free_port(), _free_port()) for name in names}

    async def worker_streams(_c: QuicPeerConnection, kind: StreamType, s: QuicStream) -> None:
        await rpc_worker_handler(lambda: splits["quic lane"].rpc_port)(
            QuicByteStream(s), host.node_id
        )

    async def host_streams(_c: QuicPeerConnection, _k: StreamType, s: QuicStream) -> None:
        s.reset(RefuseCode.UNKNOWN_STREAM)

    listeners: list[RpcTunnelListener] = []
    tasks: list[asyncio.Task[None]] = []
    keep_alive: asyncio.Future[None] | None = None
    worker_end = await QuicEndpoint.bind(worker, "127.0.0.1", 0, worker_streams, lambda _c: None)
    host_end = await QuicEndpoint.bind(host, "127.0.0.1", 0, host_streams, lambda _c: None)
    lane = await FastLaneServer.start(
        worker,
        host="127.0.0.1",
        on_connection=rpc_lane(rpc_worker_handler(lambda: splits["fast lane"].rpc_port)),
        is_allowed=lambda node: node == host.node_id,
    )
    tasks += [start(worker_end.run()), start(host_end.run()), start(lane.run())]
    try:
        with tempfile.TemporaryDirectory(prefix="mesh-llm-tunnel-") as tmp:
            model = await asyncio.to_thread(install_demo_model, Path(tmp), None)
            quic = await host_end.dial("127.0.0.1", worker_end.port, worker.node_id, TIMEOUT_S)
            # The node's heartbeat keeps its QUIC connections alive; here, pings do.
            keep_alive = asyncio.ensure_future(_keep_alive(quic))
            for name, force_quic in (("fast lane", False), ("quic lane", True)):
                record = NodeRecord(worker.node_id, 1, fast_lane_port=lane.port)
                dialer = transport(host, Links(record, quic), force_quic=force_quic)
                listener = await RpcTunnelListener.start(dialer, worker.node_id)
                listeners.append(listener)
                tasks.append(start(listener.run()))
                await _start_split(llama_binaries, model, splits[name], listener.port)
            direct = splits["direct"]
            await _start_split(llama_binaries, model, direct, direct.rpc_port)
            ready_s = await asyncio.gather(*(_wait_healthy(s, 120.0) for s in splits.values()))
            print("\nready (model loaded through the lane, all three at once): ", end="")
            print(", ".join(f"{name} {t:.1f} s" for name, t in zip(names, ready_s, strict=True)))

            answer = await asyncio.to_thread(_complete, splits["fast lane"].llama_port, 8)
            assert answer["tokens_predicted"] == 8, answer
            fast = listeners[0]
            assert fast.lane == "fast" and fast.counters.bytes_up > 10_000_000
            assert listeners[1].lane == "quic" and listeners[1].counters.bytes_up > 10_000_000
            for name in names:  # warm-up
                await asyncio.to_thread(_complete, splits[name].llama_port, 8)
            rates: dict[str, list[float]] = {name: [] for name in names}
            for _ in range(ROUNDS):  # alternating, so that all three see the same conditions
                for name in names:
                    rates[name].append(await asyncio.to_thread(_tokens_per_s, splits[name]))
            for name in names:
                rate = statistics.median(rates[name])
                print(f"{name:>10}: {rate:6.1f} tokens/s (median of {ROUNDS} x {N_PREDICT} tokens)")
            for listener in listeners:
                c = listener.counters
                print(
                    f"{c.lane} lane: {c.bytes_up / 1e6:.1f} MB up, {c.bytes_down / 1e6:.1f} MB down"
                )
    finally:
        if keep_alive is not None:
            keep_alive.cancel()
            await asyncio.gather(keep_alive, return_exceptions=True)
        for split in splits.values():
            for child in split.children:
                child.kill()
                child.wait()
        for task in reversed(tasks):
            await stop(task)
        host_end.close()
        worker_end.close()


# -- the host's tunnels, as the node wires them -------------------------------------------------


@pytest.mark.parametrize(
    ("advertised", "lane", "reason"),
    [("lane", "fast", ""), ("none", "quic", "the peer advertises no fast lane")],
)
async def test_tunnels_dial_the_advertised_fast_lane_at_the_quic_peer_address(
    nodes: Nodes, advertised: str, lane: str, reason: str
) -> None:
    port = nodes.lane.port if advertised == "lane" else 0
    record = NodeRecord(nodes.worker.node_id, 1, addrs=("192.0.2.1:9",), fast_lane_port=port)
    tunnels = RpcTunnels(transport(nodes.host, Links(record, nodes.quic)))
    serving = start(tunnels.run())
    try:
        async with asyncio.timeout(TIMEOUT_S):
            local_port = await tunnels.open(nodes.worker.node_id)
            assert await tunnels.open(nodes.worker.node_id) == local_port  # idempotent
            assert await _echo_round_trip(local_port, b"x" * 5000) == b"x" * 5000
            [status] = tunnels.snapshot()
    finally:
        await tunnels.close_all()
        await stop(serving)
    assert tunnels.snapshot() == []
    assert status["worker"] == nodes.worker.node_id and status["port"] == local_port
    assert (status["lane"], status["reason"], status["connections"]) == (lane, reason, 1)
    assert status["bytes_up"] == status["bytes_down"] == 5000


def test_fast_lane_address_without_a_link_is_the_first_advertised_one() -> None:
    record = NodeRecord(NodeId("ab"), 1, addrs=("192.0.2.1:9", "[2001:db8::1]:9"), fast_lane_port=7)
    assert fast_lane_addr_of(record, None) == ("192.0.2.1", 7)
    assert fast_lane_addr_of(replace(record, addrs=("[2001:db8::1]:9",)), None) == (
        "2001:db8::1",
        7,
    )
    assert fast_lane_addr_of(replace(record, fast_lane_port=0), None) is None
    assert fast_lane_addr_of(None, None) is None
