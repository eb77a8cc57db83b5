"""Admission of incoming QUIC connections, and the passive clients this node serves.

Every incoming connection opens a `CONTROL` stream with the hello (`net/hello.py`); `admit`
runs it as the listener within `hello_timeout_s` and marks the connection admitted, or logs
the refusal (one line with the peer's address and the reason), lets the `Refused` frame leave
and closes the connection. A passive client that was admitted keeps no membership state here:
only its control channel, for change notices (`notify_clients`), and its `ROUTES` streams are
answered with the serving nodes' records (`answer_routes`). Streams on a connection that was
not admitted are reset.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

from mesh_llm.config import NetConfig
from mesh_llm.errors import AdmissionRefused, DecodeError, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity
from mesh_llm.net.hello import Admitted, FramedChannel, admit_inbound
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.wire.messages import Digest, NodeRecord, RefuseCode, RouteReply, RouteRequest

log = logging.getLogger(__name__)


class Incoming:
    """The listener side of the hello, and the channels of admitted passive clients."""

    def __init__(
        self,
        identity: NodeIdentity,
        mesh: MeshSecret,
        timings: NetConfig,
        records: Callable[[], Iterable[NodeRecord]],
    ) -> None:
        self._identity = identity
        self._mesh = mesh
        self._timings = timings
        self._records = records  # the mesh's records, for ROUTES answers
        self._clients: set[FramedChannel] = set()

    @property
    def client_count(self) -> int:
        return len(self._clients)

    async def admit(
        self, connection: QuicPeerConnection, channel: FramedChannel
    ) -> Admitted | None:
        """Run the hello on `channel`; the admitted peer, or None (refused and closed)."""
        try:
            async with asyncio.timeout(self._timings.hello_timeout_s):
                admitted = await admit_inbound(channel, self._identity, self._mesh)
        except (AdmissionRefused, TimeoutError) as exc:
            code = exc.code if isinstance(exc, AdmissionRefused) else RefuseCode.TIMEOUT
            log.warning(
                "refused %s: %s",
                format_addr(connection.remote_addr),
                exc or "hello timeout",
                extra={"event": "peer_refused"},
            )
            await asyncio.sleep(0)  # let the Refused frame leave before the close
            connection.close_with(code, str(exc)[:100])
            return None
        connection.admitted = True  # ROUTES streams are answered only on admitted connections
        connection.admitted_id = admitted.node_id
        return admitted

    async def serve_client(self, channel: FramedChannel) -> None:
        """A passive client: remember only its channel, for change notices, until it ends."""
        self._clients.add(channel)
        try:
            while await channel.receive() is not None:
                pass
        except (DecodeError, StreamReset):
            pass
        finally:
            self._clients.discard(channel)

    def notify_clients(self) -> None:
        """A change notice to passive clients: they pull the routing table again."""
        for channel in list(self._clients):
            with contextlib.suppress(StreamReset):
                channel.send(Digest())

    async def answer_routes(self, connection: QuicPeerConnection, channel: FramedChannel) -> None:
        """A `ROUTES` stream of an admitted peer: the serving nodes' records, then the end."""
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
        channel.send(RouteReply(tuple(r for r in self._records() if r.role != "client")))
        channel.stream.write_eof()


def format_addr(addr: Any) -> str | None:
    if not addr:
        return None
    return f"{addr[0]}:{addr[1]}"
