"""The relay hop: a stream to a node this one cannot reach, through a node both reach.

Two nodes behind two NATs (or firewalls) cannot dial each other, but both hold a link to some
node they can reach, such as a public seed. `RelayHop` plays the three parts of a relayed
stream; every node can play each one:

- **opener** (`open`): on a `RELAY` stream to a relay it is linked to, it names the target
  node and the purpose (`target id (32) | purpose (1)`); the relay answers one status byte
  (0, or a `RefuseCode`: `NO_ROUTE` when it has no link to the target). Relays are tried in
  order: those whose record lists an RTT to the target (they are linked to it) first.
- **relay** (`serve_relay`): for an admitted peer, opens a `RELAYED` stream on its own link to
  the target (`source id (32) | purpose (1)`) and splices the two streams until both ends are
  done; a failure of either side breaks both off. It relays only to nodes it links directly
  (one hop), and only relayable purposes (API requests).
- **target** (`serve_relayed`): runs the responder side of the sealed-stream handshake
  (`net/sealed.py`) with the source the relay named, so the source must prove its node key
  and the mesh secret end to end, and hands the sealed stream to the purpose's handler as if
  the source had opened it directly.

The relay sees only sealed frames: it can drop or cut a stream, never read or change it. The
tasks are those of the streams' handlers (owned by the QUIC endpoint's TaskGroup). Raises
`PeerUnavailable` when no relay reaches the target.
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity, is_node_id
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.net.sealed import seal_initiator, seal_responder
from mesh_llm.net.streams import ByteStream, QuicByteStream
from mesh_llm.wire.messages import NodeRecord, RefuseCode, StreamType

log = logging.getLogger(__name__)

RELAYABLE = frozenset({StreamType.HTTP})
"""RPC sessions are never relayed: a split only uses rpc workers with a measured, low RTT."""
_HEADER_BYTES = 32 + 1
_ACCEPTED = 0
Accept = Callable[[NodeId, StreamType, ByteStream], Awaitable[None]]


class RelayLinks(Protocol):
    """What the relay hop needs of the mesh links (`PeerManager`)."""

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None: ...

    def relay_candidates(self, target: NodeId) -> list[NodeId]:
        """Linked nodes that may reach `target`, most likely first."""
        ...


def rank_relays(
    target: NodeId, linked: Iterable[NodeId], record_of: Callable[[NodeId], NodeRecord | None]
) -> list[NodeId]:
    """The linked nodes that may relay to `target`: those whose record shows an RTT to it
    (they link it) first, then the others."""

    def links_target(node: NodeId) -> bool:
        record = record_of(node)
        return record is not None and target in record.rtt_ms

    candidates = [node for node in linked if node != target]
    return sorted(candidates, key=lambda node: (not links_target(node), node))


def _header(node: NodeId, purpose: StreamType) -> bytes:
    return bytes.fromhex(node) + bytes([purpose])


def _parse_header(header: bytes) -> tuple[NodeId, StreamType]:
    node = NodeId(header[:32].hex())
    try:
        purpose = StreamType(header[32])
    except ValueError as exc:
        raise StreamReset(f"relay header names an unknown purpose {header[32]}") from exc
    if not is_node_id(node) or purpose not in RELAYABLE:
        raise StreamReset(f"relay header for a purpose that is never relayed ({purpose.name})")
    return node, purpose


def _code_name(code: int) -> str:
    try:
        return RefuseCode(code).name
    except ValueError:
        return str(code)


class RelayHop:
    """Opens, relays and accepts relayed streams for one node."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        links: RelayLinks,
        accept: Accept,
        *,
        handshake_timeout_s: float,
        max_relays_tried: int = 3,
    ) -> None:
        self._identity = identity
        self._mesh = mesh
        self._links = links
        self._accept = accept
        self._timeout_s = handshake_timeout_s
        self._max_tried = max_relays_tried
        self.via: dict[NodeId, NodeId] = {}  # target -> the relay its last stream went through
        self.relaying = 0  # streams this node relays for others right now
        self.relayed: Counter[str] = Counter()  # "opened", "relayed", "accepted", "refused"

    # -- opener ---------------------------------------------------------------------------

    async def open(self, target: NodeId, purpose: StreamType) -> ByteStream:
        """A sealed stream of `purpose` to `target` through a relay; `PeerUnavailable`."""
        if purpose not in RELAYABLE:
            raise PeerUnavailable(f"{purpose.name} streams are never relayed")
        failures: list[str] = []
        for relay in self._links.relay_candidates(target)[: self._max_tried]:
            try:
                async with asyncio.timeout(self._timeout_s):
                    stream = await self._open_via(relay, target, purpose)
            except (PeerUnavailable, StreamReset, TimeoutError) as exc:
                failures.append(f"{short_id(relay)}: {exc or 'timed out'}")
                continue
            self.via[target] = relay
            self.relayed["opened"] += 1
            return stream
        self.via.pop(target, None)
        tried = "; ".join(failures) or "no linked node to relay through"
        raise PeerUnavailable(f"no relay reaches {short_id(target)} ({tried})")

    async def _open_via(self, relay: NodeId, target: NodeId, purpose: StreamType) -> ByteStream:
        connection = self._links.connection_of(relay)
        if connection is None or connection.is_closed:
            raise PeerUnavailable("no link")
        raw = QuicByteStream(await connection.open_stream(StreamType.RELAY))
        try:
            raw.write(_header(target, purpose))
            status = (await raw.read_exactly(1))[0]
            if status != _ACCEPTED:
                raise PeerUnavailable(f"refused ({_code_name(status)})")
            return await seal_initiator(raw, self._identity, self._mesh, target, purpose)
        except BaseException:
            raw.abort()
            raise

    # -- relay ----------------------------------------------------------------------------

    async def serve_relay(self, stream: ByteStream, source: NodeId) -> None:
        """A `RELAY` stream from admitted `source`: carry it to the node it names."""
        try:
            async with asyncio.timeout(self._timeout_s):
                target, purpose = _parse_header(await stream.read_exactly(_HEADER_BYTES))
        except TimeoutError:
            log.info("relay request from %s: no header in time", short_id(source))
            stream.abort()
            return
        connection = self._links.connection_of(target)
        if target in (source, self._identity.node_id) or connection is None or connection.is_closed:
            self.relayed["refused"] += 1
            stream.write(bytes([RefuseCode.NO_ROUTE]))
            stream.close()
            return
        onward = QuicByteStream(await connection.open_stream(StreamType.RELAYED))
        onward.write(_header(source, purpose))
        stream.write(bytes([_ACCEPTED]))
        log.debug("relaying a %s stream %s -> %s", purpose.name, short_id(source), short_id(target))
        self.relaying += 1
        self.relayed["relayed"] += 1
        try:
            await splice(stream, onward)
        finally:
            self.relaying -= 1

    # -- target ---------------------------------------------------------------------------

    async def serve_relayed(self, stream: ByteStream, relay: NodeId) -> None:
        """A `RELAYED` stream from member `relay`: authenticate its source end to end."""
        try:
            async with asyncio.timeout(self._timeout_s):
                source, purpose = _parse_header(await stream.read_exactly(_HEADER_BYTES))
                sealed = await seal_responder(stream, self._identity, self._mesh, source, purpose)
        except (TimeoutError, StreamReset) as exc:
            log.info("stream relayed by %s refused: %s", short_id(relay), exc or "timed out")
            stream.abort()
            return
        self.relayed["accepted"] += 1
        log.debug(
            "%s stream from %s relayed by %s", purpose.name, short_id(source), short_id(relay)
        )
        await self._accept(source, purpose, sealed)

    def snapshot(self) -> dict[str, object]:
        """For /api/status: targets reached through a relay, and what this node relays."""
        return {
            "via": {short_id(t): short_id(r) for t, r in self.via.items()},
            "relaying": self.relaying,
            "counts": dict(self.relayed),
        }


async def splice(a: ByteStream, b: ByteStream) -> None:
    """Copy bytes both ways until both directions ended; a failure breaks both off."""

    async def pump(source: ByteStream, sink: ByteStream) -> None:
        while chunk := await source.read():
            sink.write(chunk)
            await sink.drain()
        sink.close()

    done = False
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(pump(a, b))
            group.create_task(pump(b, a))
        done = True
    except* StreamReset:
        pass
    finally:
        if not done:
            a.abort()
            b.abort()
