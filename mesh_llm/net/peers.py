"""The asyncio shell around the mesh core: QUIC links, admission, joining, passive clients.

`PeerManager` owns the node's `QuicEndpoint` and drives the sans-I/O `MeshCore`: after every
input (a message, a link up or down, a timer) it drains the core's events and commands, writes
its outbox to the links' control streams, and re-arms one timer at `next_deadline()`. It dials
the peers the core asks for, retries invite tokens with backoff (1 s → 30 s) whenever the node
has no live peer, resolves duplicate connections between the same pair (the one dialed by the
lower node id wins), and answers `ROUTES` streams from admitted passive clients without keeping
membership state for them. In client mode it is passive itself: it connects to a token's node,
pulls the routing table on connect, every `route_refresh_s`, and on every change notice, and
dials hosts on demand for API requests. `RPC` and `HTTP` streams of admitted peers go to
`inbound` (the node's `StreamHandlers`). Every task — the endpoint's stream handlers, timers,
joins, on-demand dials — belongs to the TaskGroup of `run()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, assert_never

from mesh_llm.config import NetConfig
from mesh_llm.core.events import (
    ClosePeer,
    DialPeer,
    DuplicateNodeDetected,
    MeshEvent,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRecovered,
    PeerSuspected,
    RecordChanged,
)
from mesh_llm.core.mesh import MeshCore
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import AdmissionRefused, MeshError, PeerUnavailable, ProtocolError, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity
from mesh_llm.net.hello import (
    FramedChannel,
    admit_inbound,
    admit_outbound,
)
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection, QuicStream
from mesh_llm.net.streams import ByteStream, QuicByteStream
from mesh_llm.token import InviteToken, parse_addr
from mesh_llm.wire.codec import DecodeError
from mesh_llm.wire.messages import (
    Digest,
    NodeRecord,
    RefuseCode,
    RouteReply,
    RouteRequest,
    StreamType,
)

log = logging.getLogger(__name__)

# Streams for the layers above (RPC, HTTP) of an admitted peer: `StreamHandlers.accept`.
Inbound = Callable[[NodeId, StreamType, ByteStream], Awaitable[None]]


@dataclass(slots=True)
class _Link:
    node_id: NodeId
    connection: QuicPeerConnection
    channel: FramedChannel
    dialer: NodeId  # who opened the connection: decides which of two duplicate links survives


@dataclass(slots=True)
class RouteTable:
    """What a passive client knows of the mesh: the serving nodes' records."""

    records: tuple[NodeRecord, ...] = ()
    source: NodeId | None = None
    updated_at: float = 0.0


@dataclass(slots=True)
class _Listeners:
    on_change: list[Callable[[], None]] = field(default_factory=list)

    def notify(self) -> None:
        for callback in self.on_change:
            callback()


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
    ) -> None:
        self._identity = identity
        self._mesh = mesh
        self._core = core
        self._tokens = tokens
        self._timings = timings or NetConfig()
        self._rng = rng or random.Random()
        self._endpoint: QuicEndpoint | None = None
        self._links: dict[NodeId, _Link] = {}
        self._clients: set[FramedChannel] = set()
        self._dialing: set[NodeId] = set()
        self._group: asyncio.TaskGroup | None = None
        self._wake = asyncio.Event()
        self._no_links = asyncio.Event()
        self._no_links.set()
        self._stopping = False
        self.routes = RouteTable()
        self.listeners = _Listeners()
        self._inbound = inbound
        # Client mode: links to hosts, dialled on demand (tasks of `run()`'s group).
        self._on_demand: dict[NodeId, asyncio.Task[_Link | MeshError]] = {}

    @property
    def is_client(self) -> bool:
        return self._core is None

    @property
    def port(self) -> int:
        assert self._endpoint is not None
        return self._endpoint.port

    async def bind(self, host: str, port: int) -> int:
        """Bind the UDP socket (before the invite token is printed); returns the port."""
        self._endpoint = await QuicEndpoint.bind(
            self._identity, host, port, self._on_stream, lambda _conn: None, self._timings
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
        for link in list(self._links.values()):
            with contextlib.suppress(StreamReset):
                link.channel.stream.write_eof()
        await asyncio.sleep(0)  # let aioquic transmit the leaving frames
        for link in list(self._links.values()):
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "node leaving")

    def update_self(self, **changes: Any) -> None:
        if self._core is not None:
            self._core.update_self(asyncio.get_running_loop().time(), **changes)
            self._pump()
            self._notify_clients()

    def is_admitted(self, node_id: NodeId) -> bool:
        """A mesh member gossip knows, or a node/client admitted on a live QUIC connection
        (both hold the mesh secret): who may use this node's fast lane."""
        if self._core is not None and node_id in self._core.records():
            return True
        return self._endpoint is not None and node_id in self._endpoint.admitted_ids()

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
        if not self.is_client:
            raise PeerUnavailable(f"no link to {short_id(peer)}")
        task = self._on_demand.get(peer)
        if task is None or (task.done() and _dead_link(task)):
            record = next((r for r in self.routes.records if r.node_id == node_id), None)
            if record is None:
                raise PeerUnavailable(f"{short_id(peer)} is not in the routing table")
            if self._group is None:
                raise PeerUnavailable("the mesh is not running")
            task = self._group.create_task(self._dial_on_demand(record))
            self._on_demand[peer] = task
        # Shielded: one caller going away must not cancel a dial others wait for too.
        outcome = await asyncio.shield(task)
        if isinstance(outcome, MeshError):
            self._on_demand.pop(peer, None)
            raise outcome
        return outcome.connection

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
            return
        task = self._on_demand.pop(NodeId(node_id), None)
        if task is not None and task.done() and not _dead_link(task):
            link = task.result()
            assert isinstance(link, _Link)
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "request failed")
        source = self._links.get(self.routes.source) if self.routes.source else None
        if source is not None and self._group is not None:
            self._group.create_task(self._refresh_routes(source))

    async def _dial_on_demand(self, record: NodeRecord) -> _Link | MeshError:
        """A task of the group: its failure is its result (for the callers), not the group's."""
        try:
            link = await self._dial(record.addrs, NodeId(record.node_id))
        except MeshError as exc:
            return exc
        if self._group is not None:
            self._group.create_task(self._hold_on_demand(link))
        return link

    async def _hold_on_demand(self, link: _Link) -> None:
        """Read the on-demand link's control stream (change notices) until it closes."""
        try:
            while await link.channel.receive() is not None:
                pass
        except (DecodeError, StreamReset):
            pass
        finally:
            task = self._on_demand.get(link.node_id)
            if task is not None and task.done() and _dead_link(task):
                self._on_demand.pop(link.node_id, None)
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "on-demand link ended")

    def records(self) -> list[NodeRecord]:
        """Every live record this node knows, its own included (empty for a client)."""
        return list(self._core.records().values()) if self._core is not None else []

    # -- status --------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Plain data for /api/status and `mesh-llm status`."""
        peers = []
        if self._core is not None:
            for node_id, record in self._core.records().items():
                if node_id == self._identity.node_id:
                    continue
                link = self._links.get(NodeId(node_id))
                peers.append(
                    {
                        "node_id": node_id,
                        "short_id": short_id(NodeId(node_id)),
                        "state": self._core.peer_state(node_id) or "known",
                        "linked": link is not None,
                        "address": _format_addr(link.connection.remote_addr) if link else None,
                        "rtt_ms": self._core.rtt_ms(node_id),
                        "record": _record_dict(record),
                    }
                )
        else:
            for record in self.routes.records:
                peers.append(
                    {
                        "node_id": record.node_id,
                        "short_id": short_id(NodeId(record.node_id)),
                        "state": "route",
                        "linked": record.node_id in self._links,
                        "address": None,
                        "rtt_ms": None,
                        "record": _record_dict(record),
                    }
                )
        return {"peers": peers, "clients": len(self._clients), "port": self.port}

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
            self._notify_clients()
            self.listeners.notify()

    def _notify_clients(self) -> None:
        """A change notice to passive clients: they pull the routing table again."""
        for channel in list(self._clients):
            with contextlib.suppress(StreamReset):
                channel.send(Digest())

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
        match event:
            case DialPeer(node_id=node_id, addrs=addrs):
                self._start_dial(NodeId(node_id), tuple(addrs))
                return False
            case ClosePeer(node_id=node_id, reason=reason):
                link = self._links.pop(NodeId(node_id), None)
                if link is not None:
                    link.connection.close_with(RefuseCode.TIMEOUT, reason)
                self._update_no_links()
                return True
            case PeerJoined(node_id=node_id):
                log.info(
                    "peer %s joined",
                    short_id(NodeId(node_id)),
                    extra={"event": "peer_joined", "peer": node_id},
                )
            case PeerSuspected(node_id=node_id):
                log.warning(
                    "peer %s is suspect (silent)",
                    short_id(NodeId(node_id)),
                    extra={"event": "peer_suspect", "peer": node_id},
                )
            case PeerRecovered(node_id=node_id):
                log.info(
                    "peer %s is alive again",
                    short_id(NodeId(node_id)),
                    extra={"event": "peer_recovered", "peer": node_id},
                )
            case PeerLost(node_id=node_id, reason=reason):
                log.warning(
                    "peer %s is dead: %s",
                    short_id(NodeId(node_id)),
                    reason,
                    extra={"event": "peer_dead", "peer": node_id},
                )
            case PeerLeft(node_id=node_id):
                log.info(
                    "peer %s left",
                    short_id(NodeId(node_id)),
                    extra={"event": "peer_left", "peer": node_id},
                )
            case RecordChanged(node_id=node_id):
                log.debug("record of %s changed", short_id(NodeId(node_id)))
            case DuplicateNodeDetected(node_id=node_id, detail=detail):
                log.error(
                    "another process uses this node's key (%s): %s — give each node its own "
                    "~/.mesh-llm or MESH_LLM_EPHEMERAL_KEY=1",
                    short_id(NodeId(node_id)),
                    detail,
                    extra={"event": "duplicate_node"},
                )
            case _:
                assert_never(event)
        return True

    # -- links -----------------------------------------------------------------------------

    def _register(self, link: _Link) -> bool:
        """Adopt a new admitted link unless a better one to the same peer exists."""
        current = self._links.get(link.node_id)
        if current is not None and not current.connection.is_closed:
            keep_dialer = min(self._identity.node_id, link.node_id)
            if current.dialer == keep_dialer or link.dialer != keep_dialer:
                link.connection.close_with(RefuseCode.DUPLICATE_NODE, "duplicate connection")
                return False
            current.connection.close_with(RefuseCode.DUPLICATE_NODE, "duplicate connection")
        self._links[link.node_id] = link
        self._no_links.clear()
        if self._core is not None:
            self._core.link_up(link.node_id, asyncio.get_running_loop().time())
            self._pump()
        return True

    async def _serve_link(self, link: _Link) -> None:
        """Read the control stream of an admitted peer until it ends."""
        reason = "control stream ended"
        try:
            while (message := await link.channel.receive()) is not None:
                if self._core is not None:
                    self._core.receive(link.node_id, message, asyncio.get_running_loop().time())
                    self._pump()
                elif self.is_client:
                    await self._refresh_routes(link)
        except DecodeError as exc:
            reason = f"protocol error: {exc}"
            log.warning(
                "peer %s sent garbage on its control stream: %s", short_id(link.node_id), exc
            )
            link.connection.close_with(RefuseCode.PROTOCOL_ERROR, str(exc)[:100])
        except StreamReset as exc:
            reason = str(exc)
        finally:
            self._drop(link, reason)

    def _drop(self, link: _Link, reason: str) -> None:
        if self._links.get(link.node_id) is not link:
            return  # a duplicate that lost, or already dropped
        del self._links[link.node_id]
        self._update_no_links()
        if self._core is not None and not self._stopping:
            self._core.link_down(link.node_id, asyncio.get_running_loop().time(), reason)
            self._pump()

    def _update_no_links(self) -> None:
        if not self._links:
            self._no_links.set()

    # -- inbound ---------------------------------------------------------------------------

    async def _on_stream(
        self, connection: QuicPeerConnection, kind: StreamType, stream: QuicStream
    ) -> None:
        match kind:
            case StreamType.CONTROL:
                await self._accept_control(connection, FramedChannel(stream))
            case StreamType.ROUTES:
                await self._answer_routes(connection, FramedChannel(stream))
            case StreamType.RPC | StreamType.HTTP:
                peer = connection.admitted_id
                members_only = kind is StreamType.RPC and self._core is None
                if not connection.admitted or peer is None or members_only:
                    stream.reset(RefuseCode.PROTOCOL_ERROR)
                    return
                if self._inbound is None:
                    stream.reset(RefuseCode.UNKNOWN_STREAM)
                    return
                await self._inbound(peer, kind, QuicByteStream(stream))
            case _:
                assert_never(kind)

    async def _accept_control(self, connection: QuicPeerConnection, channel: FramedChannel) -> None:
        if self._stopping:
            connection.close_with(RefuseCode.SHUTTING_DOWN, "node leaving")
            return
        try:
            async with asyncio.timeout(self._timings.hello_timeout_s):
                admitted = await admit_inbound(channel, self._identity, self._mesh)
        except (AdmissionRefused, TimeoutError) as exc:
            code = exc.code if isinstance(exc, AdmissionRefused) else RefuseCode.TIMEOUT
            log.warning(
                "refused %s: %s",
                _format_addr(connection.remote_addr),
                exc or "hello timeout",
                extra={"event": "peer_refused"},
            )
            await asyncio.sleep(0)  # let the Refused frame leave before the close
            connection.close_with(code, str(exc)[:100])
            return
        connection.admitted = True  # ROUTES streams are answered only on admitted connections
        connection.admitted_id = admitted.node_id
        if admitted.client or self._core is None:
            await self._serve_client(channel)
            return
        link = _Link(admitted.node_id, connection, channel, dialer=admitted.node_id)
        if self._register(link):
            await self._serve_link(link)

    async def _serve_client(self, channel: FramedChannel) -> None:
        """A passive client: remember only its channel, for change notices."""
        self._clients.add(channel)
        try:
            while await channel.receive() is not None:
                pass
        except (DecodeError, StreamReset):
            pass
        finally:
            self._clients.discard(channel)

    async def _answer_routes(self, connection: QuicPeerConnection, channel: FramedChannel) -> None:
        if not connection.admitted:
            channel.stream.reset(RefuseCode.PROTOCOL_ERROR)
            return
        try:
            message = await channel.receive()
        except DecodeError:
            channel.stream.reset(RefuseCode.PROTOCOL_ERROR)
            return
        if not isinstance(message, RouteRequest):
            channel.stream.reset(RefuseCode.PROTOCOL_ERROR)
            return
        records = tuple(self._core.records().values()) if self._core is not None else ()
        channel.send(RouteReply(tuple(r for r in records if r.role != "client")))
        channel.stream.write_eof()

    # -- outbound --------------------------------------------------------------------------

    def _start_dial(self, node_id: NodeId, addrs: tuple[str, ...]) -> None:
        if node_id in self._dialing or node_id in self._links or self._group is None:
            return
        self._dialing.add(node_id)
        self._group.create_task(self._dial_and_serve(addrs, node_id))

    async def _dial_and_serve(self, addrs: tuple[str, ...], expected: NodeId | None) -> None:
        try:
            link = await self._dial(addrs, expected)
        except MeshError as exc:
            log.info("could not connect to %s: %s", short_id(expected) if expected else addrs, exc)
            return
        finally:
            if expected is not None:
                self._dialing.discard(expected)
        if self._register(link):
            await self._serve_link(link)

    async def _dial(self, addrs: tuple[str, ...], expected: NodeId | None) -> _Link:
        """Try each address in turn; returns an admitted link. Raises `MeshError`."""
        assert self._endpoint is not None
        errors: list[str] = []
        for addr in addrs:
            host, port = parse_addr(addr)
            try:
                connection = await self._endpoint.dial(
                    host, port, expected, self._timings.dial_timeout_s
                )
            except PeerUnavailable as exc:
                errors.append(str(exc))
                continue
            channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
            try:
                async with asyncio.timeout(self._timings.hello_timeout_s):
                    peer = await admit_outbound(
                        channel,
                        self._identity,
                        self._mesh,
                        expected=expected,
                        client=self.is_client,
                    )
            except (AdmissionRefused, TimeoutError, StreamReset) as exc:
                connection.close_with(RefuseCode.PROTOCOL_ERROR, "admission failed")
                if isinstance(exc, AdmissionRefused):
                    raise  # a refusal is final for this attempt: wrong secret or key
                errors.append(f"{addr}: no hello answer ({exc!r})")
                continue
            connection.admitted = True
            connection.admitted_id = peer
            return _Link(peer, connection, channel, dialer=self._identity.node_id)
        raise PeerUnavailable("; ".join(errors) or "no address to dial")

    async def _join_loop(self, token: InviteToken) -> None:
        """Keep trying the token's node whenever this node has no live peer (rejoin)."""
        backoff = self._timings.join_backoff_initial_s
        while True:
            await self._no_links.wait()
            try:
                link = await self._dial(token.addrs, NodeId(token.node_id))
            except ProtocolError as exc:
                log.error(
                    "join refused by %s: %s",
                    short_id(NodeId(token.node_id)),
                    exc,
                    extra={"event": "join_refused"},
                )
            except MeshError as exc:
                log.info(
                    "join: %s unreachable (%s); retrying in %.0f s",
                    short_id(NodeId(token.node_id)),
                    exc,
                    backoff,
                )
            else:
                backoff = self._timings.join_backoff_initial_s
                if self._register(link):
                    log.info(
                        "joined the mesh through %s",
                        short_id(link.node_id),
                        extra={"event": "joined"},
                    )
                    if self.is_client:
                        await self._refresh_routes(link)
                        assert self._group is not None
                        self._group.create_task(self._refresh_routes_periodically(link))
                    await self._serve_link(link)
                continue
            await asyncio.sleep(backoff * (0.5 + self._rng.random()))
            backoff = min(backoff * 2, self._timings.join_backoff_max_s)

    # -- passive client --------------------------------------------------------------------

    async def _refresh_routes_periodically(self, link: _Link) -> None:
        while not link.connection.is_closed:
            await asyncio.sleep(self._timings.route_refresh_s)
            await self._refresh_routes(link)

    async def _refresh_routes(self, link: _Link) -> None:
        try:
            async with asyncio.timeout(self._timings.route_request_timeout_s):
                channel = FramedChannel(await link.connection.open_stream(StreamType.ROUTES))
                channel.send(RouteRequest())
                reply = await channel.receive()
        except (TimeoutError, StreamReset, DecodeError) as exc:
            log.info("route refresh from %s failed: %r", short_id(link.node_id), exc)
            return
        if isinstance(reply, RouteReply):
            self.routes = RouteTable(reply.records, link.node_id, asyncio.get_running_loop().time())
            self.listeners.notify()


def _dead_link(task: asyncio.Task[_Link | MeshError]) -> bool:
    """A finished on-demand dial whose link is unusable (failed, or closed since)."""
    if task.cancelled() or task.exception() is not None:
        return True
    outcome = task.result()
    return isinstance(outcome, MeshError) or outcome.connection.is_closed


def _format_addr(addr: Any) -> str | None:
    if not addr:
        return None
    return f"{addr[0]}:{addr[1]}"


def _record_dict(record: NodeRecord) -> Mapping[str, Any]:
    return {
        "name": record.name,
        "version": record.version,
        "addrs": list(record.addrs),
        "role": record.role,
        "vram_bytes": record.vram_bytes,
        "backend": record.backend,
        "build_id": record.build_id,
        "rpc_protocol": record.rpc_protocol,
        "models_on_disk": dict(record.models_on_disk),
        "requested_models": list(record.requested_models),
        "serving": {
            m: {"role": s.role, "ready": s.ready, "host": s.host} for m, s in record.serving.items()
        },
        "api_port": record.api_port,
        "fast_lane_port": record.fast_lane_port,
        "software_version": record.software_version,
        "demand": dict(record.demand),
    }
