"""The RPC tunnel: llama-server on a host reaches a worker's rpc-server through the mesh.

Host side, `RpcTunnelListener` listens on 127.0.0.1:<port> for one remote worker (llama-server's
`--rpc` entry points there); each accepted TCP connection is relayed to the worker over the fast
lane (`net/fastlane.py`, direct TCP + TLS 1.3) or, when that cannot be made, over an `RPC`
stream of the worker's QUIC connection. Worker side, `serve_rpc_connection` connects one such
session to the local rpc-server; `serve_rpc_stream` does it for a QUIC stream and
`rpc_lane_handler` for the fast-lane server. `relay` pumps bytes both ways with large reads,
TCP_NODELAY and no per-chunk work beyond read/write and a byte counter; a session ends when
either side ends (then both are closed: TLS over asyncio cannot half-close, and a llama.cpp RPC
session is over when either side closes). `RpcTunnels` owns the host's listeners, one per
worker, finds each worker's fast lane from its gossiped record (`fast_lane_port`, at the
address its QUIC link comes from) and reports lanes and byte counters for status. This is the
only relay of the project. Imports aioquic only through `net/quic.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, Protocol

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, ProtocolError
from mesh_llm.identity import NodeIdentity
from mesh_llm.net.fastlane import (
    STREAM_LIMIT_BYTES,
    ConnectionHandler,
    FastLaneServer,
    close_and_wait,
    fast_lane_connect,
    run_owned,
    set_no_delay,
)
from mesh_llm.net.quic import QuicPeerConnection, QuicStream, StreamReset
from mesh_llm.wire.messages import NodeRecord, RefuseCode, StreamType

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
CHUNK_BYTES = 256 * 1024
# aioquic gives no backpressure (drain never blocks, windows grow with bytes received): a QUIC
# writer waits while more than this is written but unacknowledged. Below the receiver's
# per-stream buffer cap (quic.MAX_STREAM_BUFFER_BYTES), which resets a stream that overflows.
QUIC_MAX_UNSENT_BYTES = 2 * 1024 * 1024
FAST_LANE_CONNECT_TIMEOUT_S = 5.0
# After the fast lane failed, new sessions go straight to QUIC for this long before retrying.
FAST_LANE_RETRY_S = 60.0

Lane = Literal["fast", "quic", "none"]
FastLaneAddr = Callable[[], tuple[str, int] | None]


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


class QuicStreamReader:
    """A `QuicStream` read like an `asyncio.StreamReader`; a reset reads as an error."""

    def __init__(self, stream: QuicStream) -> None:
        self._stream = stream

    async def read(self, n: int = -1) -> bytes:
        return await self._stream.read(n if n > 0 else CHUNK_BYTES)


class QuicStreamWriter:
    """A `QuicStream` written like an `asyncio.StreamWriter`.

    `drain` is our own backpressure: it waits (polling, as quic.py must) while more than
    `QUIC_MAX_UNSENT_BYTES` are unacknowledged. `close` ends our direction with a FIN so
    everything written is still delivered.
    """

    def __init__(self, stream: QuicStream) -> None:
        self._stream = stream

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    async def drain(self) -> None:
        await self._stream.wait_writable(QUIC_MAX_UNSENT_BYTES)

    def close(self) -> None:
        with contextlib.suppress(StreamReset):  # the connection is gone: nothing to end
            self._stream.write_eof()

    async def wait_closed(self) -> None:
        """Nothing to wait for: quic.py forgets the stream once both directions ended."""


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

    pumps = {asyncio.create_task(up()), asyncio.create_task(down())}
    try:
        done, _ = await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
        for pump in done:
            error = pump.exception()
            if error is not None and not isinstance(error, OSError):  # StreamReset is one
                log.warning("relay ended by an unexpected error: %r", error)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        b_writer.close()
        await close_and_wait(a_writer)
        await close_and_wait(b_writer)


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


async def serve_rpc_stream(stream: QuicStream, rpc_port: int | None) -> None:
    """Worker side of the QUIC lane: an `RPC` stream to the local rpc-server (None: refuse)."""
    if rpc_port is None:
        stream.reset(RefuseCode.UNKNOWN_STREAM)  # not a worker (any more)
        return
    await serve_rpc_connection(QuicStreamReader(stream), QuicStreamWriter(stream), rpc_port)


def rpc_lane_handler(rpc_port: Callable[[], int | None]) -> ConnectionHandler:
    """The fast-lane server's `on_connection` for a worker whose rpc-server is `rpc_port()`."""

    async def on_connection(
        peer: NodeId,
        purpose: StreamType,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        port = rpc_port()
        if purpose is not StreamType.RPC or port is None:
            log.info("fast lane from %s: no rpc-server here for it", short_id(peer))
            return
        await serve_rpc_connection(reader, writer, port)

    return on_connection


class RpcTunnelListener:
    """Host side, for one remote worker: a loopback port whose sessions reach its rpc-server."""

    def __init__(
        self,
        identity: NodeIdentity,
        worker: NodeId,
        fast_lane_addr: FastLaneAddr,
        quic: Callable[[], QuicPeerConnection | None],
        force_quic: bool,
        fast_lane_timeout_s: float,
    ) -> None:
        self._identity = identity
        self.worker = worker
        self._fast_lane_addr = fast_lane_addr
        self._quic = quic
        self._force_quic = force_quic
        self._fast_lane_timeout_s = fast_lane_timeout_s
        self._fast_lane_failed_at: float | None = None
        self._server: asyncio.Server | None = None
        self._sessions: set[asyncio.Task[None]] = set()  # see `run_owned`
        self.counters = TunnelCounters(lane="none", reason="no session yet")

    @classmethod
    async def start(
        cls,
        identity: NodeIdentity,
        worker: NodeId,
        *,
        fast_lane_addr: FastLaneAddr,
        quic: Callable[[], QuicPeerConnection | None],
        port: int = 0,
        force_quic: bool = False,
        fast_lane_timeout_s: float = FAST_LANE_CONNECT_TIMEOUT_S,
    ) -> RpcTunnelListener:
        """Listen on 127.0.0.1:`port` (0: a free port). Raises `OSError` if it cannot bind."""
        listener = cls(identity, worker, fast_lane_addr, quic, force_quic, fast_lane_timeout_s)
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

    async def close(self) -> None:
        """Stop listening and end every session."""
        if self._server is not None:
            self._server.close()
        for task in list(self._sessions):
            task.cancel()
        await asyncio.gather(*self._sessions, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await run_owned(self._sessions, self._serve(reader, writer))

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            set_no_delay(writer)
            lane = await self._open_lane()
            if lane is None:
                self.counters.lane = "none"
                return
            self.counters.lane = lane[0]
            if lane[0] == "fast":
                self.counters.reason = ""
            self.counters.connections += 1
            await relay(reader, writer, lane[1], lane[2], self.counters)
        finally:
            await close_and_wait(writer)

    async def _open_lane(self) -> tuple[Lane, ByteReader, ByteWriter] | None:
        fast = await self._open_fast_lane()
        if fast is not None:
            return "fast", fast[0], fast[1]
        connection = self._quic()
        try:
            if connection is None or connection.is_closed:
                raise PeerUnavailable("no QUIC connection")
            stream = await connection.open_stream(StreamType.RPC)
        except (PeerUnavailable, StreamReset) as exc:
            log.warning("rpc tunnel to %s: no lane (%s)", short_id(self.worker), exc)
            self.counters.reason = f"no lane: {exc}"
            return None
        return "quic", QuicStreamReader(stream), QuicStreamWriter(stream)

    async def _open_fast_lane(
        self,
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        address = self._fast_lane_addr()
        if self._force_quic or address is None:
            self.counters.reason = (
                "QUIC forced" if self._force_quic else "the worker advertises no fast lane"
            )
            return None
        now = asyncio.get_running_loop().time()
        failed_at = self._fast_lane_failed_at
        if failed_at is not None and now - failed_at < FAST_LANE_RETRY_S:
            return None  # keeps the reason of that failure
        host, port = address
        try:
            reader, writer, _ = await fast_lane_connect(
                self._identity, host, port, self.worker, self._fast_lane_timeout_s
            )
        except (PeerUnavailable, ProtocolError) as exc:
            log.info(
                "rpc tunnel to %s: fast lane failed, using QUIC: %s", short_id(self.worker), exc
            )
            self._fast_lane_failed_at = now
            self.counters.reason = f"fast lane to {host}:{port} failed: {exc}"
            return None
        self._fast_lane_failed_at = None
        return reader, writer


class PeerDirectory(Protocol):
    """What `RpcTunnels` needs of the mesh: links and gossiped records."""

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None: ...
    def records(self) -> list[NodeRecord]: ...


def fast_lane_addr_of(
    record: NodeRecord | None, connection: QuicPeerConnection | None
) -> tuple[str, int] | None:
    """Where to dial `record`'s fast lane: its advertised port, at the IP its QUIC link comes
    from (the address known to reach it), else at the first address it advertises."""
    if record is None or record.fast_lane_port == 0:
        return None
    if connection is not None and connection.remote_addr:
        return str(connection.remote_addr[0]), record.fast_lane_port
    for addr in record.addrs:
        host = addr.rsplit(":", 1)[0].strip("[]")
        if host:
            return host, record.fast_lane_port
    return None


class RpcTunnels:
    """The host's tunnel listeners, one per remote worker (`Placement`'s `Tunnels`)."""

    def __init__(
        self,
        identity: NodeIdentity,
        peers: PeerDirectory,
        *,
        fast_lane_timeout_s: float,
    ) -> None:
        self._identity = identity
        self._peers = peers
        self._fast_lane_timeout_s = fast_lane_timeout_s
        self._listeners: dict[NodeId, RpcTunnelListener] = {}

    async def open(self, worker: NodeId) -> int:
        """A loopback port whose sessions reach `worker`'s rpc-server; idempotent."""
        listener = self._listeners.get(worker)
        if listener is None:
            listener = await RpcTunnelListener.start(
                self._identity,
                worker,
                fast_lane_addr=lambda: self._fast_lane_addr(worker),
                quic=lambda: self._peers.connection_of(worker),
                fast_lane_timeout_s=self._fast_lane_timeout_s,
            )
            self._listeners[worker] = listener
        return listener.port

    async def close(self, worker: NodeId) -> None:
        listener = self._listeners.pop(worker, None)
        if listener is not None:
            await listener.close()

    async def close_all(self) -> None:
        for worker in list(self._listeners):
            await self.close(worker)

    def snapshot(self) -> list[dict[str, Any]]:
        """Per worker: loopback port, lane in use and why, sessions, bytes each way."""
        return [
            {"worker": worker, "short_id": short_id(worker), "port": listener.port}
            | asdict(listener.counters)
            for worker, listener in self._listeners.items()
        ]

    def _fast_lane_addr(self, worker: NodeId) -> tuple[str, int] | None:
        record = next((r for r in self._peers.records() if r.node_id == worker), None)
        return fast_lane_addr_of(record, self._peers.connection_of(worker))


LaneHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, NodeId], Awaitable[None]]


async def start_fast_lane(
    identity: NodeIdentity,
    host: str,
    port: int,
    is_allowed: Callable[[NodeId], bool],
    rpc_port: Callable[[], int | None],
    http: Callable[[], LaneHandler | None],
) -> FastLaneServer:
    """The node's fast-lane server: admits the nodes `is_allowed` names (mesh members and
    admitted clients), connects RPC sessions to the local rpc-server (a worker) and hands API
    connections to `http()` (the API's inbound side, once it runs)."""
    rpc = rpc_lane_handler(rpc_port)

    async def on_connection(
        peer: NodeId,
        purpose: StreamType,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        handler = http() if purpose is StreamType.HTTP else None
        if handler is not None:
            await handler(reader, writer, peer)
        elif purpose is StreamType.HTTP:
            log.info("fast lane from %s: the API is not up yet", short_id(peer))
        else:
            await rpc(peer, purpose, reader, writer)

    return await FastLaneServer.start(
        identity,
        host=host,
        port=port,
        on_connection=on_connection,
        is_allowed=lambda node: node != identity.node_id and is_allowed(node),
        purposes=frozenset({StreamType.RPC, StreamType.HTTP}),
    )
