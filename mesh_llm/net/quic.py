"""The one module that touches aioquic: a QUIC endpoint on one UDP socket, dialing and accepting.

`QuicEndpoint` binds one UDP socket per node and demultiplexes datagrams by connection id to
both accepted (server) and dialed (client) connections, so the port in the invite token is also
the source port of every outgoing connection. TLS 1.3 uses a self-signed certificate made from
the node key; the dialer pins the node id it expects and checks the peer certificate's key when
the handshake completes (aioquic has no verification callback). Streams are exposed as
`QuicStream` objects (`net/quic_stream.py`: bounded receive buffers, readers that wake on reset
or connection close); the connection feeds them and cleans up per-stream state. The handler of
each stream a peer opens is a task of the endpoint's TaskGroup (`run()`). The first byte of
every bidirectional stream is its `StreamType`. Raises `PeerUnavailable` for dial failures and
`ProtocolError(KEY_MISMATCH)` for a peer with the wrong key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

from aioquic._buffer import Buffer
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic import events
from aioquic.quic.configuration import SMALLEST_MAX_DATAGRAM_SIZE, QuicConfiguration
from aioquic.quic.connection import NetworkAddress, QuicConnection, stream_is_client_initiated
from aioquic.quic.packet import QuicPacketType, pull_quic_header
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, ProtocolError, StreamReset
from mesh_llm.identity import NodeIdentity, make_self_signed_certificate, node_id_from_certificate
from mesh_llm.net import refusals

# QuicStream is re-exported: modules that use the endpoint import it from here too.
from mesh_llm.net.quic_stream import QuicStream as QuicStream
from mesh_llm.tasks import OwnedTasks
from mesh_llm.wire.messages import ALPN, RefuseCode, StreamType

log = logging.getLogger(__name__)

StreamHandler = Callable[["QuicPeerConnection", StreamType, "QuicStream"], Awaitable[None]]
StreamOpened = Callable[["QuicPeerConnection", "QuicStream"], None]
Refused = Callable[[NodeId], None]


class QuicPeerConnection(QuicConnectionProtocol):
    """One QUIC connection to a peer, with our own stream handling (no aioquic readers)."""

    def __init__(self, quic: QuicConnection, on_stream: StreamOpened | None = None) -> None:
        super().__init__(quic)
        self._streams: dict[int, QuicStream] = {}
        self._on_stream_opened = on_stream  # the endpoint serves streams the peer opens
        self.close_reason = ""
        self.remote_addr: NetworkAddress | None = None
        self.admitted = False  # set once the hello on its control stream succeeded
        self.admitted_id: NodeId | None = None  # the node (or client) the hello proved

    @property
    def is_closed(self) -> bool:
        return self._closed.is_set()

    def peer_node_id(self) -> NodeId | None:
        """Node id of the peer's TLS certificate (None when it sent none)."""
        certificate: x509.Certificate | None = getattr(self._quic.tls, "_peer_certificate", None)
        return node_id_from_certificate(certificate) if certificate is not None else None

    async def open_stream(self, stream_type: StreamType) -> QuicStream:
        stream_id = self._quic.get_next_available_stream_id()
        stream = self._stream(stream_id)
        stream.write(bytes([stream_type]))
        return stream

    def close_with(self, code: int, reason: str) -> None:
        self.close_reason = reason
        self.close(error_code=code, reason_phrase=reason[:200])

    def _stream(self, stream_id: int) -> QuicStream:
        stream = self._streams.get(stream_id)
        if stream is None:
            stream = self._streams[stream_id] = QuicStream(self, stream_id)
        return stream

    def _send_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if self.is_closed:
            raise StreamReset("connection closed")
        try:
            self._quic.send_stream_data(stream_id, data, end_stream)
        except (RuntimeError, ValueError) as exc:
            # aioquic refuses writes to a stream it already reset (e.g. on the peer's
            # STOP_SENDING), finished or forgot: to the caller that is a stream that is gone.
            raise StreamReset(f"stream {stream_id} cannot be written: {exc}") from exc
        if end_stream:
            self._forget_if_done(stream_id)
        self._transmit_soon()

    def _unsent_bytes(self, stream_id: int) -> int:
        quic_stream = self._quic._streams.get(stream_id)
        if quic_stream is None:
            return 0
        return len(quic_stream.sender._buffer)

    def _reset_stream(self, stream_id: int, code: int) -> None:
        if not self.is_closed:
            with contextlib.suppress(AssertionError, ValueError):  # already finished that way
                self._quic.reset_stream(stream_id, code)
            with contextlib.suppress(AssertionError, ValueError):
                self._quic.stop_stream(stream_id, code)
            self._transmit_soon()
        self._streams.pop(stream_id, None)

    def _forget_if_done(self, stream_id: int) -> None:
        stream = self._streams.get(stream_id)
        if stream is not None and stream._is_done():
            self._streams.pop(stream_id, None)

    def quic_event_received(self, event: events.QuicEvent) -> None:
        if isinstance(event, events.StreamDataReceived):
            is_new = event.stream_id not in self._streams
            stream = self._stream(event.stream_id)
            stream._feed(event.data, event.end_stream)
            peer_opened = stream_is_client_initiated(event.stream_id) != self._quic._is_client
            if is_new and peer_opened:
                self._accept(stream)
        elif isinstance(event, events.StreamReset):
            reset = self._streams.pop(event.stream_id, None)
            if reset is not None:
                reset._fail(StreamReset(f"stream reset by peer (code {event.error_code})"))
        elif isinstance(event, events.StopSendingReceived):
            stopped = self._streams.get(event.stream_id)
            if stopped is not None:
                stopped._peer_stopped(
                    StreamReset(f"peer stopped reading (code {event.error_code})")
                )
        elif isinstance(event, events.ConnectionTerminated):
            self.close_reason = self.close_reason or event.reason_phrase or str(event.error_code)
            for stream in self._streams.values():
                stream._fail(StreamReset(f"connection closed: {self.close_reason}"))
            self._streams.clear()

    def _accept(self, stream: QuicStream) -> None:
        if self._on_stream_opened is None:
            stream.reset(RefuseCode.UNKNOWN_STREAM)
            return
        self._on_stream_opened(self, stream)


def _is_initial(data: bytes, header_type: QuicPacketType) -> bool:
    return len(data) >= SMALLEST_MAX_DATAGRAM_SIZE and header_type == QuicPacketType.INITIAL


class QuicEndpoint(asyncio.DatagramProtocol):
    """One UDP socket that accepts connections and dials out."""

    def __init__(
        self, identity: NodeIdentity, stream_handler: StreamHandler, timings: NetConfig
    ) -> None:
        self._identity = identity
        self._on_stream = stream_handler
        self._timings = timings
        self._connections: dict[bytes, QuicPeerConnection] = {}
        self._transport: asyncio.DatagramTransport | None = None
        self._accept_handler: Callable[[QuicPeerConnection], None] | None = None
        self._tasks = OwnedTasks()  # one task per stream a peer opens
        self._pending: list[tuple[QuicPeerConnection, QuicStream]] = []
        self._sock: socket.socket | None = None  # with IP_RECVERR: refused packets reported
        self._on_refused: Refused | None = None
        certificate_pem, key_pem = make_self_signed_certificate(identity)
        self._certificate = x509.load_pem_x509_certificate(certificate_pem)
        self._private_key = serialization.load_pem_private_key(key_pem, password=None)

    def admitted_ids(self) -> set[NodeId]:
        """The nodes (and clients) with a live connection whose hello proved their key."""
        return {
            c.admitted_id
            for c in self._connections.values()
            if c.admitted_id is not None and not c.is_closed
        }

    async def run(self) -> None:
        """Serve the streams peers open until cancelled (then those handlers are cancelled)."""
        await self._tasks.hold(on_start=self._serve_pending)

    def _serve_pending(self) -> None:
        assert self._tasks.group is not None
        for connection, stream in self._pending:
            self._tasks.group.create_task(self._dispatch(connection, stream))
        self._pending.clear()

    def _stream_opened(self, connection: QuicPeerConnection, stream: QuicStream) -> None:
        group = self._tasks.group
        if group is None:
            self._pending.append((connection, stream))  # run() serves it when it starts
            return
        try:
            group.create_task(self._dispatch(connection, stream))
        except RuntimeError:  # the group is ending: so is this endpoint
            stream.reset(RefuseCode.SHUTTING_DOWN)

    async def _dispatch(self, connection: QuicPeerConnection, stream: QuicStream) -> None:
        try:
            async with asyncio.timeout(self._timings.stream_type_timeout_s):
                first = await stream.read_exactly(1)
            stream_type = StreamType(first[0])
        except (StreamReset, TimeoutError):
            return
        except ValueError:
            log.warning("unknown stream type %d from %s: reset", first[0], connection.remote_addr)
            stream.reset(RefuseCode.UNKNOWN_STREAM)
            return
        try:
            await self._on_stream(connection, stream_type, stream)
        except StreamReset:
            pass
        except Exception:  # a handler's bug must not end the endpoint: log it, reset the stream
            log.exception("stream handler failed (%s stream)", stream_type.name)
            stream.reset(RefuseCode.PROTOCOL_ERROR)

    @classmethod
    async def bind(
        cls,
        identity: NodeIdentity,
        host: str,
        port: int,
        stream_handler: StreamHandler,
        on_accept: Callable[[QuicPeerConnection], None],
        timings: NetConfig | None = None,
        on_refused: Refused | None = None,
    ) -> QuicEndpoint:
        """Bind the UDP socket; `timings`: the idle and stream-type timeouts (defaults);
        `on_refused`: called with an admitted peer whose host refused a packet sent to it."""
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise PeerUnavailable(
                f"cannot bind UDP {host}:{port} ({exc.strerror}); choose another --bind-port"
            ) from exc
        _, endpoint = await loop.create_datagram_endpoint(
            lambda: cls(identity, stream_handler, timings or NetConfig()), sock=sock
        )
        endpoint._accept_handler = on_accept
        if on_refused is not None and refusals.enable(sock):
            endpoint._sock, endpoint._on_refused = sock, on_refused
        return endpoint

    @property
    def port(self) -> int:
        assert self._transport is not None
        port: int = self._transport.get_extra_info("sockname")[1]
        return port

    def _configuration(self, *, is_client: bool) -> QuicConfiguration:
        configuration = QuicConfiguration(
            is_client=is_client,
            alpn_protocols=[ALPN],
            idle_timeout=self._timings.quic_idle_timeout_s,
            verify_mode=ssl.CERT_NONE,  # the node id is pinned after the handshake instead
            max_datagram_frame_size=None,
        )
        if not is_client:
            configuration.certificate = self._certificate
            configuration.private_key = cast(Any, self._private_key)
        return configuration

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.DatagramTransport, transport)

    def error_received(self, exc: Exception) -> None:
        """A send or receive on the socket failed with a reported ICMP error: read them all."""
        if self._sock is None or self._on_refused is None:
            return
        refused = set(refusals.drain(self._sock))
        peers = {
            c.admitted_id
            for c in set(self._connections.values())
            if c.admitted_id is not None
            and c.remote_addr is not None
            and (str(c.remote_addr[0]), int(c.remote_addr[1])) in refused
        }
        for peer in peers:
            self._on_refused(peer)

    def datagram_received(self, data: bytes, addr: NetworkAddress) -> None:
        try:
            header = pull_quic_header(Buffer(data=data), host_cid_length=8)
        except ValueError:
            return  # not QUIC: garbage is dropped
        connection = self._connections.get(header.destination_cid)
        if connection is None and _is_initial(data, header.packet_type):
            connection = self._new_connection(
                QuicConnection(
                    configuration=self._configuration(is_client=False),
                    original_destination_connection_id=header.destination_cid,
                ),
                extra_cids=(header.destination_cid,),
            )
            connection.remote_addr = addr
            if self._accept_handler is not None:
                self._accept_handler(connection)
        if connection is not None:
            connection.datagram_received(data, addr)

    def _new_connection(
        self, quic: QuicConnection, extra_cids: tuple[bytes, ...] = ()
    ) -> QuicPeerConnection:
        connection = QuicPeerConnection(quic, self._stream_opened)
        connection.connection_made(cast(asyncio.BaseTransport, self._transport))
        connection._connection_id_issued_handler = partial(self._cid_issued, connection)
        connection._connection_id_retired_handler = partial(self._cid_retired, connection)
        connection._connection_terminated_handler = partial(self._terminated, connection)
        for cid in (*extra_cids, quic.host_cid):
            self._connections[cid] = connection
        return connection

    def _cid_issued(self, connection: QuicPeerConnection, cid: bytes) -> None:
        self._connections[cid] = connection

    def _cid_retired(self, connection: QuicPeerConnection, cid: bytes) -> None:
        if self._connections.get(cid) is connection:
            del self._connections[cid]

    def _terminated(self, connection: QuicPeerConnection) -> None:
        for cid in [c for c, conn in self._connections.items() if conn is connection]:
            del self._connections[cid]

    async def dial(
        self, host: str, port: int, expected: NodeId | None, timeout_s: float
    ) -> QuicPeerConnection:
        """Connect to host:port; with `expected`, the peer's certificate must carry that key."""
        addr = (host, port)
        quic = QuicConnection(configuration=self._configuration(is_client=True))
        connection = self._new_connection(quic)
        connection.remote_addr = addr
        try:
            async with asyncio.timeout(timeout_s):
                connection.connect(addr)
                await connection.wait_connected()
        except (TimeoutError, ConnectionError, OSError) as exc:
            connection.close()
            self._terminated(connection)
            raise PeerUnavailable(f"cannot reach {host}:{port} over QUIC ({exc!r})") from exc
        except asyncio.CancelledError:  # another address won the race (net/links.py)
            connection.close()
            self._terminated(connection)
            raise
        actual = connection.peer_node_id()
        if expected is not None and actual != expected:
            connection.close_with(RefuseCode.KEY_MISMATCH, "key mismatch")
            raise ProtocolError(
                f"{host}:{port} presented key {short_id(actual or NodeId('?'))}, expected "
                f"{short_id(expected)}: not the node the token or gossip named",
                RefuseCode.KEY_MISMATCH,
            )
        return connection

    def close(self) -> None:
        for connection in set(self._connections.values()):
            connection.close()
        self._connections.clear()
        if self._transport is not None:
            self._transport.close()
