"""`PeerTransport`: the one way to reach a peer — `open(peer, purpose)` gives a `ByteStream`.

Two lanes reach a peer. The fast lane is a direct TCP + TLS 1.3 connection to the port the
peer advertises in its record (`net/fastlane.py`), dialled at the IP its QUIC link comes from;
it costs far less per byte and per round trip than aioquic. QUIC is a stream of the peer's
admitted QUIC connection (`net/quic.py`), always there for a linked peer. `open` tries the fast
lane when the purpose may use it and the peer has one, and remembers a failed dial (one memory
per peer, for every purpose) so that QUIC carries that peer's streams for
`fast_lane_retry_s` before the fast lane is tried again. Each choice and its reason stays
readable (`reason_of`) for status. When a peer cannot be reached at all (no link, and none can
be dialled: it is behind a NAT or a firewall), API streams go through a relay, a node both
reach (`net/relay.py`), sealed end to end; the relay is kept for `fast_lane_retry_s` before a
direct link is tried again.

The serving side is `StreamHandlers`: one handler per purpose (`serve`); QUIC streams (from
`net/peers.py`) and fast-lane connections (`start_fast_lane_server`) of that purpose go to
it as `ByteStream`s, with the admitted peer's id. Raises `PeerUnavailable` when no lane reaches
the peer.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Protocol

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, ProtocolError
from mesh_llm.identity import NodeIdentity
from mesh_llm.net.fastlane import FastLaneServer, fast_lane_connect
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.net.relay import RELAYABLE
from mesh_llm.net.streams import ByteStream, QuicByteStream, TcpByteStream
from mesh_llm.wire.messages import NodeRecord, StreamType

log = logging.getLogger(__name__)

Handler = Callable[[ByteStream, NodeId], Awaitable[None]]
Clock = Callable[[], float]
# API requests need the QUIC link first even when the fast lane carries them: a passive
# client's host admits its fast lane only once the client proved itself on QUIC.
NEEDS_LINK = frozenset({StreamType.HTTP})


class Links(Protocol):
    """What the transport needs of the mesh links (`PeerManager`)."""

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None: ...

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        """An admitted connection (a passive client dials on demand); `PeerUnavailable`."""
        ...

    def record_of(self, node_id: NodeId) -> NodeRecord | None: ...


class Relay(Protocol):
    """What the transport needs of the relay hop (`RelayHop`)."""

    via: dict[NodeId, NodeId]

    async def open(self, target: NodeId, purpose: StreamType) -> ByteStream: ...


class StreamHandlers:
    """The serving side: who answers the streams of each purpose."""

    def __init__(self) -> None:
        self._handlers: dict[StreamType, Handler] = {}

    def serve(self, purpose: StreamType, handler: Handler) -> None:
        self._handlers[purpose] = handler

    async def accept(self, peer: NodeId, purpose: StreamType, stream: ByteStream) -> None:
        """Hand an admitted peer's stream to its purpose's handler (none yet: break it off)."""
        handler = self._handlers.get(purpose)
        if handler is None:
            log.info("%s stream from %s: nothing serves it yet", purpose.name, short_id(peer))
            stream.abort()
            return
        await handler(stream, peer)


class PeerTransport:
    """Opens streams to peers over the fast lane or QUIC."""

    def __init__(
        self,
        identity: NodeIdentity,
        links: Links,
        *,
        fast_lane_purposes: frozenset[StreamType],
        connect_timeout_s: float,
        fast_lane_retry_s: float,
        relay: Relay | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self._identity = identity
        self._links = links
        self._fast_lane_purposes = fast_lane_purposes
        self._connect_timeout_s = connect_timeout_s
        self._retry_s = fast_lane_retry_s
        self._clock = clock
        self._relay = relay
        self._down_until: dict[NodeId, float] = {}
        self._relay_until: dict[NodeId, float] = {}  # no direct link lately: relay for now
        self._reasons: dict[NodeId, str] = {}

    async def open(self, peer: NodeId, purpose: StreamType) -> ByteStream:
        """A new stream of `purpose` to `peer`. Raises `PeerUnavailable`."""
        relayable = self._relay is not None and purpose in RELAYABLE
        relay_for_now = self._clock() < self._relay_until.get(peer, 0.0)
        if relayable and relay_for_now and self._links.connection_of(peer) is None:
            return await self._open_relayed(peer, purpose, self.reason_of(peer))
        try:
            connection = await self._links.connection_for(peer) if purpose in NEEDS_LINK else None
        except PeerUnavailable as exc:
            if not relayable:
                raise
            return await self._open_relayed(peer, purpose, f"no direct link: {exc}")
        self._relay_until.pop(peer, None)
        fast = await self._open_fast_lane(peer, purpose)
        if fast is not None:
            return fast
        connection = connection or self._links.connection_of(peer)
        if connection is None or connection.is_closed:
            reason = f"no lane: no QUIC connection ({self.reason_of(peer)})"
            self._reasons[peer] = reason
            raise PeerUnavailable(f"{short_id(peer)}: {reason}")
        return QuicByteStream(await connection.open_stream(purpose))

    async def _open_relayed(self, peer: NodeId, purpose: StreamType, why: str) -> ByteStream:
        assert self._relay is not None
        stream = await self._relay.open(peer, purpose)
        if self._clock() >= self._relay_until.get(peer, 0.0):
            log.info(
                "%s cannot be reached directly (%s); relaying through %s for %.0f s",
                short_id(peer),
                why,
                short_id(self._relay.via[peer]),
                self._retry_s,
            )
            self._relay_until[peer] = self._clock() + self._retry_s
        self._reasons[peer] = why
        return stream

    def relayed_now(self) -> dict[NodeId, NodeId]:
        """Peers reached through a relay for now, and the relay of each."""
        now, via = self._clock(), self._relay.via if self._relay is not None else {}
        return {p: via[p] for p, until in self._relay_until.items() if until > now and p in via}

    def reason_of(self, peer: NodeId) -> str:
        """Why streams to `peer` go over QUIC ("" while the fast lane carries them)."""
        return self._reasons.get(peer, "")

    def on_quic_for_now(self) -> list[NodeId]:
        """Peers whose fast lane failed lately: QUIC carries their streams for now."""
        now = self._clock()
        return [peer for peer, until in self._down_until.items() if until > now]

    def fast_lane_eligible(self, peer: NodeId, purpose: StreamType) -> bool:
        """Whether `open(peer, purpose)` would try the fast lane now (the purpose may use it,
        the peer has one, no failed dial is remembered): a pool then lets its QUIC streams
        to `peer` go, so that its requests return to the fast lane."""
        if purpose not in self._fast_lane_purposes:
            return False
        address = fast_lane_addr_of(self._links.record_of(peer), self._links.connection_of(peer))
        return address is not None and self._clock() >= self._down_until.get(peer, 0.0)

    async def _open_fast_lane(self, peer: NodeId, purpose: StreamType) -> ByteStream | None:
        if purpose not in self._fast_lane_purposes:
            self._reasons[peer] = "QUIC forced"
            return None
        address = fast_lane_addr_of(self._links.record_of(peer), self._links.connection_of(peer))
        if address is None:
            self._reasons[peer] = "the peer advertises no fast lane"
            return None
        if self._clock() < self._down_until.get(peer, 0.0):
            return None  # keeps the reason of that failure
        host, port = address
        try:
            reader, writer, _ = await fast_lane_connect(
                self._identity, host, port, peer, self._connect_timeout_s, purpose
            )
        except (PeerUnavailable, ProtocolError) as exc:
            log.info(
                "no fast lane to %s (%s); QUIC carries its streams for %.0f s",
                short_id(peer),
                exc,
                self._retry_s,
            )
            self._down_until[peer] = self._clock() + self._retry_s
            self._reasons[peer] = f"fast lane to {host}:{port} failed: {exc}"
            return None
        self._down_until.pop(peer, None)
        self._reasons[peer] = ""
        return TcpByteStream(reader, writer)


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


async def start_fast_lane_server(
    identity: NodeIdentity,
    host: str,
    port: int,
    is_allowed: Callable[[NodeId], bool],
    handlers: StreamHandlers,
    limits: NetConfig,
) -> FastLaneServer:
    """The node's fast-lane server: admits the nodes `is_allowed` names (mesh members and
    admitted clients) and hands each connection to the handler of its purpose."""
    return await FastLaneServer.start(
        identity,
        host=host,
        port=port,
        on_connection=lambda peer, purpose, reader, writer: handlers.accept(
            peer, purpose, TcpByteStream(reader, writer)
        ),
        is_allowed=lambda node: node != identity.node_id and is_allowed(node),
        purposes=frozenset({StreamType.RPC, StreamType.HTTP}),
        limits=limits,
    )
