"""RPC tunnel over QUIC: llama-server on the host reaches a worker's rpc-server through the mesh.

Host side, `QuicRpcTunnels.open(worker)` listens on 127.0.0.1:<port>; every TCP connection
llama-server makes there (its `--rpc` entry) becomes one `RPC` stream on the QUIC connection to
that worker. Worker side, `serve_rpc_stream` connects each such stream to the local rpc-server.
Both directions are streamed with bounded buffering (aioquic has no backpressure: the writer
waits while too many bytes are unacknowledged); either side closing ends both. Byte counters
per worker are kept for status. This is the QUIC lane; the direct TCP+TLS fast lane of
DESIGN.md §4 is not built yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from dataclasses import dataclass

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable
from mesh_llm.net.quic import QuicPeerConnection, QuicStream, StreamReset
from mesh_llm.wire.messages import RefuseCode, StreamType

log = logging.getLogger(__name__)

CHUNK_BYTES = 256 * 1024
MAX_UNSENT_BYTES = 4 * 1024 * 1024
LOOPBACK = "127.0.0.1"


@dataclass(slots=True)
class TunnelCounters:
    bytes_to_worker: int = 0
    bytes_from_worker: int = 0
    connections: int = 0
    lane: str = "quic"


ConnectionLookup = Callable[[NodeId], QuicPeerConnection | None]


class QuicRpcTunnels:
    """Loopback listeners on the host, one per remote worker, relayed over QUIC streams."""

    def __init__(self, connection_of: ConnectionLookup) -> None:
        self._connection_of = connection_of
        self._servers: dict[NodeId, asyncio.Server] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.counters: dict[NodeId, TunnelCounters] = {}

    async def open(self, worker: NodeId) -> int:
        """A local port whose connections reach `worker`'s rpc-server; idempotent."""
        server = self._servers.get(worker)
        if server is None:
            counters = self.counters.setdefault(worker, TunnelCounters())

            async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
                await self._relay_to(worker, reader, writer, counters)

            server = await asyncio.start_server(accepted, LOOPBACK, 0)
            self._servers[worker] = server
        port: int = server.sockets[0].getsockname()[1]
        return port

    async def close(self, worker: NodeId) -> None:
        server = self._servers.pop(worker, None)
        if server is not None:
            server.close()
            with contextlib.suppress(Exception):
                await server.wait_closed()

    async def close_all(self) -> None:
        for worker in list(self._servers):
            await self.close(worker)

    async def _relay_to(
        self,
        worker: NodeId,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        counters: TunnelCounters,
    ) -> None:
        _no_delay(writer)
        connection = self._connection_of(worker)
        try:
            if connection is None or connection.is_closed:
                raise PeerUnavailable(f"no link to worker {short_id(worker)}")
            stream = await connection.open_stream(StreamType.RPC)
        except (PeerUnavailable, StreamReset) as exc:
            log.warning("rpc tunnel to %s: %s", short_id(worker), exc)
            writer.close()
            return
        counters.connections += 1
        await relay(reader, writer, stream, counters, to_stream="bytes_to_worker")


async def serve_rpc_stream(stream: QuicStream, rpc_port: int | None) -> None:
    """Worker side: connect an incoming RPC stream to the local rpc-server and relay."""
    if rpc_port is None:
        stream.reset(RefuseCode.UNKNOWN_STREAM)  # not a worker (any more)
        return
    try:
        reader, writer = await asyncio.open_connection(LOOPBACK, rpc_port)
    except OSError as exc:
        log.warning("rpc-server on port %d unreachable: %s", rpc_port, exc)
        stream.reset(RefuseCode.PROTOCOL_ERROR)
        return
    _no_delay(writer)
    await relay(reader, writer, stream, TunnelCounters(), to_stream="bytes_from_worker")


async def relay(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    stream: QuicStream,
    counters: TunnelCounters,
    *,
    to_stream: str,
) -> None:
    """Pump TCP ↔ QUIC stream until either side ends; then close both."""
    from_stream = "bytes_from_worker" if to_stream == "bytes_to_worker" else "bytes_to_worker"

    async def tcp_to_stream() -> None:
        while data := await reader.read(CHUNK_BYTES):
            await stream.wait_writable(MAX_UNSENT_BYTES)
            stream.write(data)
            setattr(counters, to_stream, getattr(counters, to_stream) + len(data))
        stream.write_eof()

    async def stream_to_tcp() -> None:
        while data := await stream.read(CHUNK_BYTES):
            writer.write(data)
            setattr(counters, from_stream, getattr(counters, from_stream) + len(data))
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()

    up = asyncio.ensure_future(tcp_to_stream())
    down = asyncio.ensure_future(stream_to_tcp())
    clean = False
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        if up in done and up.exception() is None:
            await down  # the local side finished sending: let the answer drain
            clean = True
    except (StreamReset, ConnectionError):
        pass
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()
        if not clean:  # either side failed or closed first: end the other side too
            with contextlib.suppress(Exception):
                stream.reset(RefuseCode.SHUTTING_DOWN)


def _no_delay(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
