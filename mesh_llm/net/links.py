"""Member links: the node's admitted QUIC links to other nodes, one per peer.

`dial_link` dials a peer's addresses in turn and runs the hello as the dialer (it proves this
node's key and the mesh secret, and checks the peer's). `Links` is the table of admitted links
by node id: `register` adopts a new link unless a better one to the same peer exists (when two
nodes dial each other at once, the connection dialed by the lower node id survives), `read`
reads a link's control stream until it ends and then drops it, and `no_links` is set while the
table is empty (the join loop waits on it). Adopting and dropping a link are reported through
the `on_up`/`on_down` callbacks (the mesh core's `link_up`/`link_down`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import (
    AdmissionRefused,
    DecodeError,
    PeerUnavailable,
    ProtocolError,
    StreamReset,
)
from mesh_llm.identity import MeshSecret, NodeIdentity
from mesh_llm.net.hello import FramedChannel, admit_outbound
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.token import parse_addr
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
    """Try each address in turn; returns an admitted link. Raises `PeerUnavailable` when no
    address answers, `AdmissionRefused` when the peer refuses us (final for this attempt)."""
    errors: list[str] = []
    mismatch: ProtocolError | None = None
    for addr in addrs:
        host, port = parse_addr(addr)
        try:
            connection = await endpoint.dial(host, port, expected, timings.dial_timeout_s)
        except PeerUnavailable as exc:
            errors.append(str(exc))
            continue
        except ProtocolError as exc:
            if exc.code != RefuseCode.KEY_MISMATCH:
                raise
            # Another node at this address (often this node itself: every machine has the
            # same Docker 172.17.0.1 and the same port): try the next address.
            mismatch = exc
            errors.append(str(exc))
            continue
        channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
        try:
            async with asyncio.timeout(timings.hello_timeout_s):
                peer = await admit_outbound(
                    channel, identity, mesh, expected=expected, client=client
                )
        except (AdmissionRefused, TimeoutError, StreamReset) as exc:
            connection.close_with(RefuseCode.PROTOCOL_ERROR, "admission failed")
            if isinstance(exc, AdmissionRefused):
                raise  # a refusal is final for this attempt: wrong secret or key
            errors.append(f"{addr}: no hello answer ({exc!r})")
            continue
        connection.admitted = True
        connection.admitted_id = peer
        return Link(peer, connection, channel, dialer=identity.node_id)
    if mismatch is not None:
        raise mismatch  # no address answered as the expected node: say so, as a refusal
    raise PeerUnavailable("; ".join(errors) or "no address to dial")


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
