"""The RPC tunnel: llama-server on a host reaches a worker's rpc-server through the mesh.

Host side, `RpcTunnelListener` listens on 127.0.0.1:<port> for one remote worker (llama-server's
`--rpc` entry points there); each accepted TCP connection is relayed to the worker over a
`ByteStream` of purpose `RPC` from `PeerTransport` (the fast lane when it can, else QUIC — the
tunnel does not care which). Worker side, `rpc_worker_handler` serves such streams by
connecting each to the local rpc-server. `relay` pumps bytes both ways with large reads,
TCP_NODELAY and no per-chunk work beyond read/write and a byte counter; a session ends when
either side ends (then both are closed: TLS over asyncio cannot half-close, and a llama.cpp RPC
session is over when either side closes). `RpcTunnels` owns the host's listeners, one per
worker, and reports for status the lane each one uses, why, and byte counters. Sessions are
tasks of their listener's TaskGroup (`run()`), listeners tasks of `RpcTunnels.run()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, StreamReset
from mesh_llm.net.fastlane import STREAM_LIMIT_BYTES, close_and_wait, set_no_delay
from mesh_llm.net.streams import ByteStream
from mesh_llm.net.transport import Handler
from mesh_llm.tasks import OwnedTasks
from mesh_llm.wire.messages import StreamType

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK_BYTES = 256 * 1024

# The lane of a tunnel's stream, or none ("relay" never: RPC streams are not relayed).
Lane = Literal["fast", "quic", "relay", "none"]


class Dialer(Protocol):
    """What a tunnel needs of `PeerTransport`."""

    async def open(self, peer: NodeId, purpose: StreamType) -> ByteStream: ...

    def reason_of(self, peer: NodeId) -> str: ...


@dataclass(slots=True)
class TunnelCounters:
    """Bytes relayed host → worker (`bytes_up`) and back, sessions opened, the last lane and
    why that lane (for status: "fast lane failed: …" when QUIC carries it)."""

    bytes_up: int = 0
    bytes_down: int = 0
    connections: int = 0
    lane: Lane = "fast"
    reason: str = ""


class ByteReader(Protocol):
    async def read(self, n: int = -1) -> bytes: ...


class ByteWriter(Protocol):
    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def relay(
    a_reader: ByteReader,
    a_writer: ByteWriter,
    b_reader: ByteReader,
    b_writer: ByteWriter,
    counters: TunnelCounters,
) -> None:
    """Pump a → b (counted in `bytes_up`) and b → a (`bytes_down`) until either side ends.

    End of stream, a reset or a connection error on either side ends the session: both writers
    are then closed. Cancelling `relay` closes both too. Raises nothing but `CancelledError`.
    """

    async def up() -> None:
        while data := await a_reader.read(CHUNK_BYTES):
            b_writer.write(data)
            counters.bytes_up += len(data)
            await b_writer.drain()

    async def down() -> None:
        while data := await b_reader.read(CHUNK_BYTES):
            a_writer.write(data)
            counters.bytes_down += len(data)
            await a_writer.drain()

    try:
        async with asyncio.TaskGroup() as group:  # the first pump to end ends the other
            pumps = [group.create_task(_ended(up())), group.create_task(_ended(down()))]
            done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
        for pump in done:
            error = pump.result()
            if error is not None and not isinstance(error, OSError | StreamReset):
                log.warning("relay ended by an unexpected error: %r", error)
    finally:
        b_writer.close()
        await close_and_wait(a_writer)
        await close_and_wait(b_writer)


async def _ended(pump: Awaitable[None]) -> Exception | None:
    """Run one direction of a relay; how it ended (its error, not a cancel) as a value, so the
    relay's TaskGroup never ends in an ExceptionGroup."""
    try:
        await pump
    except Exception as exc:
        return exc
    return None


async def serve_rpc_connection(
    reader: ByteReader,
    writer: ByteWriter,
    rpc_port: int,
    counters: TunnelCounters | None = None,
) -> None:
    """Worker side: relay one tunnelled session to the rpc-server on 127.0.0.1:`rpc_port`.

    Closes `writer` if the rpc-server cannot be reached (logged, not raised).
    """
    try:
        rpc_reader, rpc_writer = await asyncio.open_connection(
            LOOPBACK, rpc_port, limit=STREAM_LIMIT_BYTES
        )
    except OSError as exc:
        log.warning("rpc-server on port %d unreachable: %s", rpc_port, exc)
        await close_and_wait(writer)
        return
    set_no_delay(rpc_writer)
    await relay(reader, writer, rpc_reader, rpc_writer, counters or TunnelCounters())


def rpc_worker_handler(rpc_port: Callable[[], int | None]) -> Handler:
    """The `RPC` stream handler of a worker whose rpc-server listens on `rpc_port()` (None:
    not a worker, or not any more — the stream is broken off)."""

    async def serve(stream: ByteStream, peer: NodeId) -> None:
        port = rpc_port()
        if port is None:
            log.info("rpc stream from %s: no rpc-server here for it", short_id(peer))
            stream.abort()
            return
        await serve_rpc_connection(stream, stream, port)

    return serve


class RpcTunnelListener:
    """Host side, for one remote worker: a loopback port whose sessions reach its rpc-server."""

    def __init__(self, dialer: Dialer, worker: NodeId) -> None:
        self._dialer = dialer
        self.worker = worker
        self._server: asyncio.Server | None = None
        self._tasks = OwnedTasks()  # one task per session
        self._pending: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.sessions = 0  # in progress now
        self.counters = TunnelCounters(lane="none", reason="no session yet")

    @classmethod
    async def start(cls, dialer: Dialer, worker: NodeId, port: int = 0) -> RpcTunnelListener:
        """Listen on 127.0.0.1:`port` (0: a free port); sessions start with `run()`. Raises
        `OSError` if it cannot bind."""
        listener = cls(dialer, worker)
        listener._server = await asyncio.start_server(
            listener._accepted, LOOPBACK, port, limit=STREAM_LIMIT_BYTES
        )
        return listener

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def lane(self) -> Lane:
        """The lane of the latest session ("none" before the first one)."""
        return self.counters.lane

    async def run(self) -> None:
        """Relay sessions until cancelled; then stop listening and end every session."""
        try:
            # No new session while the group ends: stop listening when cancelled.
            await self._tasks.hold(on_start=self._serve_pending, on_stop=self._stop_listening)
        finally:
            self._stop_listening()

    def _serve_pending(self) -> None:
        assert self._tasks.group is not None
        for reader, writer in self._pending:
            self._tasks.group.create_task(self._serve(reader, writer))
        self._pending.clear()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        group = self._tasks.group
        if group is None:
            self._pending.append((reader, writer))  # run() serves them when it starts
            return
        try:
            group.create_task(self._serve(reader, writer))
        except RuntimeError:  # the group is ending: so is this listener
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sessions += 1
        try:
            set_no_delay(writer)
            try:
                stream = await self._dialer.open(self.worker, StreamType.RPC)
            except PeerUnavailable as exc:
                log.warning("rpc tunnel to %s: %s", short_id(self.worker), exc)
                self.counters.lane = "none"
                self.counters.reason = self._dialer.reason_of(self.worker) or f"no lane: {exc}"
                return
            self.counters.lane = stream.lane
            self.counters.reason = self._dialer.reason_of(self.worker)
            self.counters.connections += 1
            await relay(reader, writer, stream, stream, self.counters)
        finally:
            self.sessions -= 1
            await close_and_wait(writer)


class RpcTunnels:
    """The host's tunnel listeners, one per remote worker (`Placement`'s `Tunnels`); each
    listener runs as a task of `run()`."""

    def __init__(self, dialer: Dialer) -> None:
        self._dialer = dialer
        self._listeners: dict[NodeId, tuple[RpcTunnelListener, asyncio.Task[None]]] = {}
        self._tasks = OwnedTasks()  # one task per listener
        self._running = asyncio.Event()

    async def run(self) -> None:
        """Own the listeners until cancelled (then they end with their sessions)."""
        try:
            await self._tasks.hold(on_start=self._running.set)
        finally:
            self._running.clear()
            self._listeners.clear()

    async def open(self, worker: NodeId) -> int:
        """A loopback port whose sessions reach `worker`'s rpc-server; idempotent. Waits for
        `run()` to have started (the node starts it with the mesh)."""
        known = self._listeners.get(worker)
        if known is not None:
            return known[0].port
        await self._running.wait()
        assert self._tasks.group is not None
        known = self._listeners.get(worker)  # opened by another caller meanwhile
        if known is not None:
            return known[0].port
        listener = await RpcTunnelListener.start(self._dialer, worker)
        self._listeners[worker] = (listener, self._tasks.group.create_task(listener.run()))
        return listener.port

    async def close(self, worker: NodeId) -> None:
        known = self._listeners.pop(worker, None)
        if known is not None:
            known[1].cancel()
            await asyncio.wait([known[1]])

    async def close_all(self) -> None:
        for worker in list(self._listeners):
            await self.close(worker)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per worker: loopback port, lane in use and why, sessions, bytes each way."""
        return [
            {"worker": worker, "short_id": short_id(worker), "port": listener.port}
            | asdict(listener.counters)
            for worker, (listener, _task) in self._listeners.items()
        ]
