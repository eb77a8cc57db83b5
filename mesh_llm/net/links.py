"""Member links: the node's admitted QUIC links to other nodes, one per peer.

`dial_link` dials a peer's addresses in a staggered race (the first admitted link wins) and
runs the hello as the dialer (it proves this node's key and the mesh secret, and checks the
peer's). `Links` is the table of admitted links by node id: `register` adopts a new link
unless a better one to the same peer exists (when two nodes dial each other at once, the
connection dialed by the lower node id survives), `read` reads a link's control stream until
it ends and then drops it, and `no_links` is set while the table is empty: `keep_joined`,
the join loop, waits on it and then dials the invite token's node again, with backoff.
Adopting and dropping a link are reported through the `on_up`/`on_down` callbacks (the mesh
core's `link_up`/`link_down`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import (
    DecodeError,
    MeshError,
    PeerUnavailable,
    ProtocolError,
    StreamReset,
)
from mesh_llm.identity import MeshSecret, NodeIdentity
from mesh_llm.net.hello import FramedChannel, admit_outbound
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.token import InviteToken, parse_addr
from mesh_llm.wire.messages import Message, RefuseCode, StreamType

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Link:
    """An admitted QUIC connection to a peer and its control stream."""

    node_id: NodeId
    connection: QuicPeerConnection
    channel: FramedChannel
    dialer: NodeId  # who opened the connection: decides which of two duplicate links survives


async def dial_link(
    endpoint: QuicEndpoint,
    identity: NodeIdentity,
    mesh: MeshSecret,
    timings: NetConfig,
    addrs: tuple[str, ...],
    expected: NodeId | None,
    *,
    client: bool,
) -> Link:
    """Dial the addresses in a staggered race (happy eyeballs: each starts `dial_stagger_s`
    after the previous one, or at once when that one failed); the first admitted link wins
    and the other attempts are cancelled (their connections closed). Returns that link.
    Raises `PeerUnavailable` when no address answers, `AdmissionRefused` when the peer refuses
    us (final for this attempt: the race stops)."""
    race = _DialRace(endpoint, identity, mesh, timings, expected, client)
    async with asyncio.TaskGroup() as group:
        previous: _Turn | None = None
        for addr in addrs:
            turn = _Turn()
            race.tasks.append(group.create_task(race.attempt(addr, previous, turn)))
            previous = turn
    if race.winner is not None:
        return race.winner
    if race.fatal is not None:
        raise race.fatal
    if race.mismatch is not None:
        raise race.mismatch  # no address answered as the expected node: say so, as a refusal
    raise PeerUnavailable("; ".join(race.errors) or "no address to dial")


@dataclass(slots=True)
class _Turn:
    """One attempt's progress, which the next attempt waits on before it starts."""

    started: asyncio.Event = field(default_factory=asyncio.Event)
    failed: asyncio.Event = field(default_factory=asyncio.Event)


class _DialRace:
    """The attempts of one `dial_link`: who won, what failed."""

    def __init__(
        self,
        endpoint: QuicEndpoint,
        identity: NodeIdentity,
        mesh: MeshSecret,
        timings: NetConfig,
        expected: NodeId | None,
        client: bool,
    ) -> None:
        self._endpoint = endpoint
        self._identity = identity
        self._mesh = mesh
        self._timings = timings
        self._expected = expected
        self._client = client
        self.tasks: list[asyncio.Task[None]] = []
        self.winner: Link | None = None
        self.fatal: Exception | None = None
        self.mismatch: ProtocolError | None = None
        self.errors: list[str] = []

    async def attempt(self, addr: str, previous: _Turn | None, turn: _Turn) -> None:
        if previous is not None:  # start a stagger after the previous one, or once it failed
            await previous.started.wait()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._timings.dial_stagger_s):
                    await previous.failed.wait()
        turn.started.set()
        try:
            link = await self._dial(addr)
        except PeerUnavailable as exc:
            self.errors.append(str(exc))
        except ProtocolError as exc:
            if exc.code != RefuseCode.KEY_MISMATCH:
                self._stop(exc)
            else:
                # Another node at this address (often this node itself: every machine has the
                # same Docker 172.17.0.1 and the same port): the other addresses go on.
                self.mismatch = exc
                self.errors.append(str(exc))
        except Exception as exc:  # a refusal (wrong secret or key) or else: final, raised
            self._stop(exc)
        else:
            if self.winner is not None:  # admitted at the same moment as the winner
                link.connection.close_with(RefuseCode.DUPLICATE_NODE, "duplicate connection")
                return
            self.winner = link
            self._cancel_others()
            return
        turn.failed.set()

    def _stop(self, exc: Exception) -> None:
        if self.fatal is None and self.winner is None:
            self.fatal = exc
        self._cancel_others()

    def _cancel_others(self) -> None:
        current = asyncio.current_task()
        for task in self.tasks:
            if task is not current:
                task.cancel()

    async def _dial(self, addr: str) -> Link:
        host, port = parse_addr(addr)
        connection = await self._endpoint.dial(
            host, port, self._expected, self._timings.dial_timeout_s
        )
        try:
            channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
            async with asyncio.timeout(self._timings.hello_timeout_s):
                peer = await admit_outbound(
                    channel,
                    self._identity,
                    self._mesh,
                    expected=self._expected,
                    client=self._client,
                )
        except (TimeoutError, StreamReset) as exc:
            connection.close_with(RefuseCode.PROTOCOL_ERROR, "admission failed")
            raise PeerUnavailable(f"{addr}: no hello answer ({exc!r})") from exc
        except BaseException:  # refused, or cancelled: another address won
            connection.close_with(RefuseCode.PROTOCOL_ERROR, "admission failed")
            raise
        connection.admitted = True
        connection.admitted_id = peer
        return Link(peer, connection, channel, dialer=self._identity.node_id)


class Links:
    """The admitted links by peer, with duplicate arbitration."""

    def __init__(
        self,
        own_id: NodeId,
        on_up: Callable[[Link], None],
        on_down: Callable[[Link, str], None],
    ) -> None:
        self._own_id = own_id
        self._on_up = on_up
        self._on_down = on_down
        self._table: dict[NodeId, Link] = {}
        self.no_links = asyncio.Event()
        self.no_links.set()

    def __contains__(self, node_id: object) -> bool:
        return node_id in self._table

    def __iter__(self) -> Iterator[Link]:
        return iter(list(self._table.values()))

    def get(self, node_id: NodeId) -> Link | None:
        return self._table.get(node_id)

    def register(self, link: Link) -> bool:
        """Adopt a new admitted link unless a better one to the same peer exists."""
        current = self._table.get(link.node_id)
        if current is not None and not current.connection.is_closed:
            keep_dialer = min(self._own_id, link.node_id)
            if current.dialer == keep_dialer or link.dialer != keep_dialer:
                link.connection.close_with(RefuseCode.DUPLICATE_NODE, "duplicate connection")
                return False
            current.connection.close_with(RefuseCode.DUPLICATE_NODE, "duplicate connection")
        self._table[link.node_id] = link
        self.no_links.clear()
        self._on_up(link)
        return True

    def close(self, node_id: NodeId, code: RefuseCode, reason: str) -> None:
        """Close and forget the link to `node_id` (the core gave up on it)."""
        link = self._table.pop(node_id, None)
        if link is not None:
            link.connection.close_with(code, reason)
        self._update_no_links()

    async def read(
        self, link: Link, on_message: Callable[[Link, Message], Awaitable[None]]
    ) -> None:
        """Read `link`'s control stream until it ends, handing each message to `on_message`;
        then drop the link (a peer that sends garbage is closed with `PROTOCOL_ERROR`)."""
        reason = "control stream ended"
        try:
            while (message := await link.channel.receive()) is not None:
                await on_message(link, message)
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

    def _drop(self, link: Link, reason: str) -> None:
        if self._table.get(link.node_id) is not link:
            return  # a duplicate that lost, or already dropped
        del self._table[link.node_id]
        self._update_no_links()
        self._on_down(link, reason)

    def _update_no_links(self) -> None:
        if not self._table:
            self.no_links.set()


async def keep_joined(
    token: InviteToken,
    links: Links,
    dial: Callable[[tuple[str, ...], NodeId], Awaitable[Link]],
    joined: Callable[[Link], Awaitable[None]],
    timings: NetConfig,
    rng: random.Random,
) -> None:
    """Dial the token's node whenever `links` is empty, and serve the link made (`joined`)
    until it ends; failed dials back off from `join_backoff_initial_s` to `join_backoff_max_s`
    (jittered ×0.5–1.5). Runs until cancelled."""
    backoff = timings.join_backoff_initial_s
    peer = NodeId(token.node_id)
    while True:
        await links.no_links.wait()
        try:
            link = await dial(token.addrs, peer)
        except ProtocolError as exc:
            log.error(
                "join refused by %s: %s", short_id(peer), exc, extra={"event": "join_refused"}
            )
        except MeshError as exc:
            log.info("join: %s unreachable (%s); retrying in %.0f s", short_id(peer), exc, backoff)
        else:
            backoff = timings.join_backoff_initial_s
            await joined(link)
            continue
        await asyncio.sleep(backoff * (0.5 + rng.random()))
        backoff = min(backoff * 2, timings.join_backoff_max_s)
