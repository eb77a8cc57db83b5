"""The asyncio shell around the mesh core: the node's QUIC endpoint, gossip and joining.

`PeerManager` owns the node's `QuicEndpoint` and drives the sans-I/O `MeshCore`: after every
input (a message, a link up or down, a timer) it drains the core's events and commands, writes
its outbox to the links' control streams, and re-arms one timer at `next_deadline()`. It dials
the peers the core asks for and retries invite tokens with backoff (1 s → 30 s) whenever the
node has no live peer. Its parts, each a concern of its own: `net/links.py` (the admitted links,
dialing, duplicate arbitration), `net/incoming.py` (admission of incoming connections, the
passive clients served, `ROUTES` answers) and, in client mode, `net/route_puller.py` (the
routing table pulled from the mesh, hosts dialled on demand). `RPC` and `HTTP` streams of
admitted peers go to `inbound` (the node's `StreamHandlers`). Every task — the endpoint's
stream handlers, timers, joins, dials, the route puller — belongs to the TaskGroup of `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any, assert_never

from mesh_llm.config import NetConfig
from mesh_llm.core.events import (
    ClosePeer,
    DialPeer,
    MeshEvent,
)
from mesh_llm.core.mesh import MeshCore
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import MeshError, PeerUnavailable, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity
from mesh_llm.net.hello import FramedChannel
from mesh_llm.net.incoming import Incoming
from mesh_llm.net.links import Link, Links, dial_link, keep_joined
from mesh_llm.net.peer_report import log_mesh_event, member_row, route_row
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection, QuicStream
from mesh_llm.net.relay import rank_relays
from mesh_llm.net.route_puller import RoutePuller, RouteTable
from mesh_llm.net.streams import ByteStream, QuicByteStream
from mesh_llm.token import InviteToken
from mesh_llm.wire.messages import Message, NodeRecord, RefuseCode, StreamType

__all__ = ["Inbound", "PeerManager", "RouteTable"]

log = logging.getLogger(__name__)

# Streams for the layers above (RPC, HTTP) of an admitted peer: `StreamHandlers.accept`.
Inbound = Callable[[NodeId, StreamType, ByteStream], Awaitable[None]]


class PeerManager:
    """Links to peers over QUIC, driven by a `MeshCore` (or passive, in client mode)."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        core: MeshCore | None,
        *,
        tokens: tuple[InviteToken, ...] = (),
        timings: NetConfig | None = None,
        rng: random.Random | None = None,
        inbound: Inbound | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self._identity = identity
        self._mesh = mesh
        self._core = core
        self._tokens = tokens
        self._timings = timings or NetConfig()
        self._rng = rng or random.Random()
        self._endpoint: QuicEndpoint | None = None
        self._links = Links(identity.node_id, self._link_up, self._link_down)
        self._incoming = Incoming(identity, mesh, self._timings, self.records)
        self._dialing: set[NodeId] = set()
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._stopping = False
        self._on_change = on_change  # the mesh (or the routing table) changed
        self._inbound = inbound
        # Client mode: the routing table and the hosts dialled on demand.
        self._puller = (
            RoutePuller(self._dial_as_client, self._timings, on_change) if core is None else None
        )

    @property
    def is_client(self) -> bool:
        return self._core is None

    @property
    def port(self) -> int:
        assert self._endpoint is not None
        return self._endpoint.port

    @property
    def routes(self) -> RouteTable:
        """What a passive client knows of the mesh (empty for a member)."""
        return self._puller.routes if self._puller is not None else RouteTable()

    async def bind(self, host: str, port: int) -> int:
        """Bind the UDP socket (before the invite token is printed); returns the port."""
        self._endpoint = await QuicEndpoint.bind(
            self._identity,
            host,
            port,
            self._on_stream,
            lambda _conn: None,
            self._timings,
            on_refused=self._refused,
        )
        return self._endpoint.port

    async def run(self) -> None:
        """Run until cancelled; on cancellation, leave cleanly and close every link."""
        assert self._endpoint is not None, "bind() first"
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                group.create_task(self._endpoint.run())
                if self._core is not None:
                    group.create_task(self._drive_timers())
                if self._puller is not None:
                    group.create_task(self._puller.run())
                for token in self._tokens:
                    group.create_task(self._join_loop(token))
        finally:
            self._group = None
            self._endpoint.close()

    async def leave(self) -> None:
        """Tell every peer we leave (they drop us at once), then close the links."""
        self._stopping = True
        loop = asyncio.get_running_loop()
        if self._core is not None:
            self._core.leave(loop.time())
            self._flush_outbox()
        for link in self._links:
            with contextlib.suppress(StreamReset):
                link.channel.stream.write_eof()
        await asyncio.sleep(0)  # let aioquic transmit the leaving frames
        for link in self._links:
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "node leaving")

    def update_self(self, **changes: Any) -> None:
        if self._core is not None:
            self._core.update_self(asyncio.get_running_loop().time(), **changes)
            self._pump()
            self._incoming.notify_clients()

    def is_admitted(self, node_id: NodeId) -> bool:
        """A mesh member gossip knows, or a node/client admitted on a live QUIC connection
        (both hold the mesh secret): who may use this node's fast lane."""
        if self._core is not None and node_id in self._core.records():
            return True
        return self._endpoint is not None and node_id in self._endpoint.admitted_ids()

    def is_linked(self, node_id: NodeId) -> bool:
        """An admitted link to `node_id` exists (a member's gossip link, a client's token node)."""
        return node_id in self._links

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None:
        link = self._links.get(node_id)
        return link.connection if link is not None else None

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        """An admitted connection to `node_id` for API requests; raises `PeerUnavailable`.

        A mesh member uses its gossip link. A passive client dials the host on demand (the
        address comes from the routing table) and keeps the connection while it lives."""
        peer = NodeId(node_id)
        link = self._links.get(peer)
        if link is not None and not link.connection.is_closed:
            return link.connection
        if self._puller is None:
            raise PeerUnavailable(f"no link to {short_id(peer)}")
        return await self._puller.connection_for(peer)

    def record_of(self, node_id: NodeId) -> NodeRecord | None:
        """`node_id`'s record: from gossip for a member, from the routing table for a client."""
        records = self.records() or self.routes.records
        return next((r for r in records if r.node_id == node_id), None)

    def report_failure(self, node_id: str, reason: str) -> None:
        """On-use detection: an API request to `node_id` failed before its answer."""
        log.info("request to %s failed: %s", short_id(NodeId(node_id)), reason)
        if self._core is not None:
            self._core.report_failure(node_id, asyncio.get_running_loop().time())
            self._pump()
        elif self._puller is not None:
            self._puller.report_failure(NodeId(node_id))

    def _refused(self, node_id: NodeId) -> None:
        """A packet to `node_id` was refused by its host: a hint of process death."""
        if self._core is not None and not self._stopping:
            log.debug("a packet to %s was refused (port unreachable)", short_id(node_id))
            self._core.peer_refused(node_id, asyncio.get_running_loop().time())
            self._pump()

    def records(self) -> list[NodeRecord]:
        """Every live record this node knows, its own included (empty for a client)."""
        return list(self._core.records().values()) if self._core is not None else []

    # -- status --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain data for /api/status and `mesh-llm status`."""
        if self._core is not None:
            core, own = self._core, self._identity.node_id
            rows = [
                member_row(core, NodeId(node_id), record, self.connection_of(NodeId(node_id)))
                for node_id, record in core.records().items()
                if node_id != own
            ]
        else:
            rows = [route_row(r, r.node_id in self._links) for r in self.routes.records]
        return {"peers": rows, "clients": self._incoming.client_count, "port": self.port}

    # -- the core driver -----------------------------------------------------------------

    async def _drive_timers(self) -> None:
        """Run `tick()` at the core's deadline, or sooner when an input moved it."""
        assert self._core is not None
        loop = asyncio.get_running_loop()
        while True:
            deadline = self._core.next_deadline()
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is None or timeout > 0:
                # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a cancellation
                # that races with the event being set, and the task would never end.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(timeout):
                        await self._wake.wait()
            else:
                await asyncio.sleep(0)  # never starve the loop, even if a deadline is stale
            self._wake.clear()
            self._core.tick(loop.time())
            self._drain()

    def _pump(self) -> None:
        """After an input from outside the driver: drain, and let the driver re-arm."""
        self._drain()
        self._wake.set()

    def _drain(self) -> None:
        """Handle the core's events and commands, send its outbox."""
        assert self._core is not None
        changed = False
        while (event := self._core.next_event()) is not None:
            changed = self._on_event(event) or changed
        self._flush_outbox()
        if changed:
            self._incoming.notify_clients()
            self._on_change()

    def _flush_outbox(self) -> None:
        assert self._core is not None
        for peer, message in self._core.outbox():
            link = self._links.get(NodeId(peer))
            if link is None:
                continue
            try:
                link.channel.send(message)
            except StreamReset:
                continue

    def _on_event(self, event: MeshEvent | DialPeer | ClosePeer) -> bool:
        """Carry out a command of the core, or log an event; whether the mesh changed."""
        match event:
            case DialPeer(node_id=node_id, addrs=addrs):
                self._start_dial(NodeId(node_id), tuple(addrs))
                return False
            case ClosePeer(node_id=node_id, reason=reason):
                self._links.close(NodeId(node_id), RefuseCode.TIMEOUT, reason)
                return True
            case _:
                log_mesh_event(event)
                return True

    # -- links -----------------------------------------------------------------------------

    def _link_up(self, link: Link) -> None:
        if self._core is not None:
            self._core.link_up(link.node_id, asyncio.get_running_loop().time())
            self._pump()

    def _link_down(self, link: Link, reason: str) -> None:
        if self._core is not None and not self._stopping:
            self._core.link_down(link.node_id, asyncio.get_running_loop().time(), reason)
            self._pump()

    async def _on_message(self, link: Link, message: Message) -> None:
        """A message on a link's control stream: gossip for the core, or (client mode) a
        change notice: pull the routing table again."""
        if self._core is not None:
            self._core.receive(link.node_id, message, asyncio.get_running_loop().time())
            self._pump()
        elif self._puller is not None:
            await self._puller.refresh(link)

    async def _serve_link(self, link: Link) -> None:
        if self._links.register(link):
            await self._links.read(link, self._on_message)

    # -- inbound ---------------------------------------------------------------------------

    async def _on_stream(
        self, connection: QuicPeerConnection, kind: StreamType, stream: QuicStream
    ) -> None:
        match kind:
            case StreamType.CONTROL:
                await self._accept_control(connection, FramedChannel(stream))
            case StreamType.ROUTES:
                await self._incoming.answer_routes(connection, FramedChannel(stream))
            case StreamType.RPC | StreamType.HTTP | StreamType.RELAY | StreamType.RELAYED:
                peer = connection.admitted_id
                if not connection.admitted or peer is None or not self._may_open(peer, kind):
                    stream.reset(RefuseCode.PROTOCOL_ERROR)
                    return
                if self._inbound is None:
                    stream.reset(RefuseCode.UNKNOWN_STREAM)
                    return
                await self._inbound(peer, kind, QuicByteStream(stream))
            case _:
                assert_never(kind)

    def _may_open(self, peer: NodeId, kind: StreamType) -> bool:
        """A passive client serves nothing but API streams; only a member relays, and only a
        member's stream may carry a relayed one to us."""
        if kind is StreamType.HTTP:
            return True
        if self._core is None:
            return False
        return kind is not StreamType.RELAYED or peer in self._core.records()

    def relay_candidates(self, target: NodeId) -> list[NodeId]:
        """Linked nodes that may relay to `target`, most likely first."""
        linked = [link.node_id for link in self._links if not link.connection.is_closed]
        return rank_relays(target, linked, self.record_of)

    async def _accept_control(self, connection: QuicPeerConnection, channel: FramedChannel) -> None:
        if self._stopping:
            connection.close_with(RefuseCode.SHUTTING_DOWN, "node leaving")
            return
        admitted = await self._incoming.admit(connection, channel)
        if admitted is None:
            return
        if admitted.client or self._core is None:
            await self._incoming.serve_client(channel)
            return
        await self._serve_link(Link(admitted.node_id, connection, channel, admitted.node_id))

    # -- outbound --------------------------------------------------------------------------

    def _start_dial(self, node_id: NodeId, addrs: tuple[str, ...]) -> None:
        if node_id in self._dialing or node_id in self._links or self._group is None:
            return
        self._dialing.add(node_id)
        self._group.create_task(self._dial_and_serve(addrs, node_id))

    async def _dial_and_serve(self, addrs: tuple[str, ...], expected: NodeId) -> None:
        try:
            link = await self._dial(addrs, expected)
        except MeshError as exc:
            log.info("could not connect to %s: %s", short_id(expected), exc)
            return
        finally:
            self._dialing.discard(expected)
        await self._serve_link(link)

    async def _dial(self, addrs: tuple[str, ...], expected: NodeId | None) -> Link:
        """An admitted link to the first of `addrs` that answers. Raises `MeshError`."""
        assert self._endpoint is not None
        return await dial_link(
            self._endpoint,
            self._identity,
            self._mesh,
            self._timings,
            addrs,
            expected,
            client=self.is_client,
        )

    async def _dial_as_client(self, addrs: tuple[str, ...], expected: NodeId) -> Link:
        return await self._dial(addrs, expected)

    async def _join_loop(self, token: InviteToken) -> None:
        """Keep trying the token's node whenever this node has no live peer (rejoin)."""
        await keep_joined(token, self._links, self._dial, self._joined, self._timings, self._rng)

    async def _joined(self, link: Link) -> None:
        """Serve the link made through a token until it ends (a client pulls routes on it)."""
        if not self._links.register(link):
            return
        log.info("joined the mesh through %s", short_id(link.node_id), extra={"event": "joined"})
        if self._puller is not None:
            await self._puller.joined(link)
        await self._links.read(link, self._on_message)
