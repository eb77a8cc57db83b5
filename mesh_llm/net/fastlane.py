"""The fast lane: a direct TCP + TLS 1.3 connection between two nodes, authenticated by node keys.

aioquic is pure Python and CPU-bound, so bulk and latency-critical byte streams (llama.cpp RPC
sessions, later model-file transfers) take a direct TLS connection instead.
`FastLaneServer.start` listens (its connections are tasks of `run()`); `fast_lane_connect`
dials, pins the server's node id and names the purpose of the connection (a `StreamType`
byte). Both give plain asyncio reader/writer pairs once both sides are authenticated. Raises
`PeerUnavailable` when the lane cannot be made and `ProtocolError` for a wrong key or a
refusal. Imports no aioquic.

Authentication (`net/fastlane_auth.py`): the server proves its key in the TLS handshake and
the client pins it; the client proves its key inside the channel by signing a fresh nonce of
the server's; the server answers one status byte before any payload flows. The server's
refusals and failures are logged here, once each, rate-limited.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from typing import Protocol

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, ProtocolError, StreamReset
from mesh_llm.identity import NodeIdentity
from mesh_llm.logs import RateLimitedLog
from mesh_llm.net.fastlane_auth import (
    challenge_client,
    client_context,
    pin_server,
    prove_client,
    server_context,
)
from mesh_llm.tasks import OwnedTasks
from mesh_llm.wire.messages import StreamType

log = logging.getLogger(__name__)

_DEFAULTS = NetConfig()  # the timeouts of callers that pass none
# StreamReader buffer: large so that one read can return a large chunk (pauses at 2x this).
STREAM_LIMIT_BYTES = 1024 * 1024

ConnectionHandler = Callable[
    [NodeId, StreamType, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


def set_no_delay(writer: asyncio.StreamWriter) -> None:
    """TCP_NODELAY on the writer's socket (TLS or plain): RPC messages are small and chatty."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Closable(Protocol):
    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


async def close_and_wait(writer: Closable, timeout_s: float = _DEFAULTS.close_timeout_s) -> None:
    """Close `writer` and wait (up to `timeout_s`) until its transport has let go, so that no
    transport outlives its session; errors of an already broken connection are moot."""
    writer.close()
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(timeout_s):
            await writer.wait_closed()


class FastLaneServer:
    """Accepts fast-lane connections; hands authenticated ones to `on_connection`.

    A connection is accepted as plain TCP with reading paused and waits (a socket, no TLS
    buffers) for one of `max_pending` handshake slots; it must have done TLS and proved its key
    within `handshake_timeout_s` of being accepted. Beyond `max_waiting` unauthenticated
    connections a new
    one is closed unread, so a flood of connections that never finish TLS costs a bounded
    amount of memory (asyncio holds ~0.5 MB of buffers per TLS handshake). Each refused or
    failed connection is logged once with its reason, at most `log_lines_per_s` a second.
    """

    def __init__(
        self,
        identity: NodeIdentity,
        on_connection: ConnectionHandler,
        is_allowed: Callable[[NodeId], bool],
        purposes: frozenset[StreamType],
        limits: NetConfig,
    ) -> None:
        self._identity = identity
        self._on_connection = on_connection
        self._is_allowed = is_allowed
        self._purposes = purposes
        self._handshake_timeout_s = limits.fast_lane_handshake_timeout_s
        self._max_waiting = limits.fast_lane_max_waiting
        self._slots = asyncio.Semaphore(limits.fast_lane_max_pending)
        self._failures = RateLimitedLog(
            log, limits.fast_lane_log_lines_per_s, "fast-lane connections refused or failed"
        )
        self._context: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._tasks = OwnedTasks()  # one task per connection, see `run()`
        self._early: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.waiting = 0  # connections accepted, not yet authenticated (tests read these)
        self.pending = 0  # of those, in their TLS handshake or key proof (holding a slot)
        self.most_pending = 0  # the highest `pending` seen
        self.refused = 0  # connections closed unread because `max_waiting` were waiting

    @classmethod
    async def start(
        cls,
        identity: NodeIdentity,
        *,
        host: str = "0.0.0.0",
        port: int = 0,
        on_connection: ConnectionHandler,
        is_allowed: Callable[[NodeId], bool],
        purposes: frozenset[StreamType] = frozenset({StreamType.RPC}),
        limits: NetConfig = _DEFAULTS,
    ) -> FastLaneServer:
        """Listen on host:port (0: any free port). Raises `PeerUnavailable` if it cannot bind."""
        lane = cls(identity, on_connection, is_allowed, purposes, limits)
        lane._context = await asyncio.to_thread(server_context, identity)  # temporary files
        try:
            lane._server = await asyncio.start_server(
                lane._accepted, host, port, limit=STREAM_LIMIT_BYTES
            )
        except OSError as exc:
            raise PeerUnavailable(
                f"cannot listen for the fast lane on TCP {host}:{port} ({exc.strerror}); "
                "choose another port"
            ) from exc
        log.info("fast lane listening on TCP %s:%d", host, lane.port)
        return lane

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    async def run(self) -> None:
        """Serve connections until cancelled; then stop listening and end every one."""
        try:
            # No new connection while the group ends: stop listening when cancelled.
            await self._tasks.hold(on_start=self._serve_early, on_stop=self._stop_listening)
        finally:
            self._stop_listening()
            self._failures.flush()

    def _serve_early(self) -> None:
        assert self._tasks.group is not None
        for reader, writer in self._early:
            self._tasks.group.create_task(self._serve(reader, writer))
        self._early.clear()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called from connection_made, before the transport reads: nothing is read until the
        # TLS layer is in place (or the connection is closed unread).
        transport = writer.transport
        if isinstance(transport, asyncio.ReadTransport):  # a socket transport: always
            transport.pause_reading()
        if self.waiting >= self._max_waiting:
            self.refused += 1
            self._failures.log(
                logging.WARNING,
                "fast lane: refused a connection from %s: %d connections unauthenticated",
                _peer_addr(writer),
                self.waiting,
                event="fast_lane_refused",
                reason="too_many_pending",
            )
            writer.transport.abort()
            return
        self.waiting += 1
        group = self._tasks.group
        if group is None:
            self._early.append((reader, writer))  # run() serves them when it starts
            return
        try:
            group.create_task(self._serve(reader, writer))
        except RuntimeError:  # the group is ending: so is this server
            self.waiting -= 1
            writer.transport.abort()

    def _count_pending(self, change: int) -> None:
        self.pending += change
        self.most_pending = max(self.most_pending, self.pending)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = _peer_addr(writer)
        accepted: tuple[NodeId, StreamType] | None = None
        try:
            try:
                accepted = await self._handshake(reader, writer, peer)
            finally:
                self.waiting -= 1
            if accepted is not None:
                await self._on_connection(accepted[0], accepted[1], reader, writer)
        except (OSError, asyncio.IncompleteReadError, TimeoutError, StreamReset) as exc:
            log.info("fast lane connection from %s ended: %r", peer, exc)
        except Exception:
            log.exception("fast lane handler failed for %s", peer)
        finally:
            if accepted is None:
                writer.transport.abort()  # TLS may not be up: nothing to close gracefully
            else:
                await close_and_wait(writer)

    async def _handshake(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[NodeId, StreamType] | None:
        """TLS, then the client's key proof, within `handshake_timeout_s`: the client's node id
        and purpose, or None (the reason logged once) when it failed or was refused."""
        assert self._context is not None
        timeout_s = self._handshake_timeout_s
        try:
            async with asyncio.timeout(timeout_s), self._slots:
                self._count_pending(+1)
                try:
                    await writer.start_tls(self._context, ssl_handshake_timeout=timeout_s)
                    set_no_delay(writer)
                    return await self._authenticate(reader, writer, peer)
                finally:
                    self._count_pending(-1)
        except TimeoutError:
            reason = f"handshake not done within {timeout_s:g} s"
        except (OSError, asyncio.IncompleteReadError) as exc:  # ssl.SSLError is an OSError
            reason = f"handshake failed: {exc!r}"
        self._failures.log(
            logging.INFO,
            "fast lane: connection from %s dropped: %s",
            peer,
            reason,
            event="fast_lane_failed",
            reason=reason,
        )
        return None

    async def _authenticate(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str
    ) -> tuple[NodeId, StreamType] | None:
        """The client's node id and purpose, or None after refusing it (status sent)."""
        proof, refusal = await challenge_client(
            reader, writer, self._identity, self._is_allowed, self._purposes
        )
        if refusal is not None:
            self._failures.log(
                logging.WARNING,
                "fast lane: refused %s from %s (%s)",
                short_id(proof.client),
                peer,
                refusal.name,
                event="fast_lane_refused",
                reason=refusal.name,
            )
            return None
        return proof.client, StreamType(proof.purpose)


async def fast_lane_connect(
    identity: NodeIdentity,
    host: str,
    port: int,
    expected: NodeId,
    timeout_s: float,
    purpose: StreamType = StreamType.RPC,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, NodeId]:
    """Dial a fast-lane server whose key must be `expected`; `(reader, writer, peer id)`.

    `timeout_s` bounds TCP connect, TLS handshake and authentication together. Raises
    `PeerUnavailable` if the connection cannot be made, `ProtocolError(KEY_MISMATCH)` if the
    server holds another key, `ProtocolError(code)` if it refuses us.
    """
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout_s):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=client_context(), limit=STREAM_LIMIT_BYTES
            )
            set_no_delay(writer)
            pin_server(writer, host, port, expected)
            await prove_client(reader, writer, identity, expected, purpose, f"{host}:{port}")
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        if writer is not None:
            await close_and_wait(writer)
        raise PeerUnavailable(f"no fast lane to {host}:{port} ({exc!r})") from exc
    except ProtocolError:
        assert writer is not None
        await close_and_wait(writer)
        raise
    return reader, writer, expected


def _peer_addr(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"
