"""The fast lane: a direct TCP + TLS 1.3 connection between two nodes, authenticated by node keys.

aioquic is pure Python and CPU-bound, so bulk and latency-critical byte streams (llama.cpp RPC
sessions, later model-file transfers) take a direct TLS connection instead.
`FastLaneServer.start` listens (its connections are tasks of `run()`); `fast_lane_connect`
dials, pins the server's node id and names the purpose of the connection (a `StreamType`
byte). Both give plain asyncio reader/writer pairs once both sides are authenticated. Raises
`PeerUnavailable` when the lane cannot be made and `ProtocolError` for a wrong key or a
refusal. Imports no aioquic.

Authentication. Python's `ssl` has no verification callback: a server with `CERT_OPTIONAL` or
`CERT_REQUIRED` rejects any client certificate that does not chain to a CA it loaded, and a
peer's self-signed certificate cannot be known in advance (it is made per process), while a
server with `CERT_NONE` does not ask for a client certificate at all. So:

- The server proves its key in the TLS handshake (TLS 1.3 CertificateVerify signs the
  transcript with the key in its certificate, which is the node key); the client uses
  `CERT_NONE` and pins it after the handshake: `node_id_from_certificate` of
  `getpeercert(binary_form=True)` must equal the node id it expects (from gossip).
- The client proves its key inside the encrypted channel: the server sends a fresh 32-byte
  nonce; the client answers with its public key and an Ed25519 signature over a context label,
  the server's key, its own key, the nonce and the purpose byte. Binding the server's key stops
  a malicious server from relaying the proof to another node; the nonce makes it fresh (TLS
  1.3 gives Python no exporter or channel binding to sign instead). The server checks the
  signature, asks `is_allowed(node_id)`, and answers one status byte (0 = accepted, else a
  `RefuseCode`) before any payload flows.

Wire format after the TLS handshake:
  server → client: b"MLFL" | version (1) | nonce (32)
  client → server: version (1) | client public key (32) | signature (64) | purpose (1)
  server → client: status (1)
A client the server does not allow is refused with `KEY_MISMATCH`, an unsupported purpose with
`UNKNOWN_STREAM`, a bad signature with `BAD_SIGNATURE`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Protocol

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import IdentityError, PeerUnavailable, ProtocolError, StreamReset
from mesh_llm.identity import (
    NodeIdentity,
    make_self_signed_certificate,
    node_id_from_certificate,
    verify_signature,
)
from mesh_llm.logs import RateLimitedLog
from mesh_llm.wire.messages import RefuseCode, StreamType

log = logging.getLogger(__name__)

MAGIC = b"MLFL"
VERSION = 1
NONCE_BYTES = 32
KEY_BYTES = 32
SIGNATURE_BYTES = 64
ACCEPTED = 0
SIGNATURE_CONTEXT = b"mesh-llm fast lane v1\x00"
_DEFAULTS = NetConfig()  # the timeouts of callers that pass none
# StreamReader buffer: large so that one read can return a large chunk (pauses at 2x this).
STREAM_LIMIT_BYTES = 1024 * 1024

ConnectionHandler = Callable[
    [NodeId, StreamType, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]
]


def server_context(identity: NodeIdentity) -> ssl.SSLContext:
    """TLS 1.3 only, our self-signed certificate; the client is authenticated after TLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.verify_mode = ssl.CERT_NONE  # see the module docstring: the nonce proof instead
    _load_identity(context, identity)
    return context


def client_context() -> ssl.SSLContext:
    """TLS 1.3 only; no CA: the server's key is pinned after the handshake."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_3
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _load_identity(context: ssl.SSLContext, identity: NodeIdentity) -> None:
    # `load_cert_chain` only reads files: write them to a private temporary directory.
    certificate_pem, key_pem = make_self_signed_certificate(identity)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-tls-") as directory:
        certificate_path, key_path = Path(directory, "cert.pem"), Path(directory, "key.pem")
        certificate_path.write_bytes(certificate_pem)
        descriptor = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(key_pem)
        context.load_cert_chain(certificate_path, key_path)


def signed_data(server: NodeId, client: NodeId, nonce: bytes, purpose: int) -> bytes:
    """What the client signs: the context label, both keys, the server's nonce, the purpose."""
    return (
        SIGNATURE_CONTEXT + bytes.fromhex(server) + bytes.fromhex(client) + nonce + bytes([purpose])
    )


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


def _peer_node_id(writer: asyncio.StreamWriter) -> NodeId | None:
    ssl_object = writer.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not certificate:
        return None
    try:
        return node_id_from_certificate(certificate)
    except IdentityError:
        return None


class FastLaneServer:
    """Accepts fast-lane connections; hands authenticated ones to `on_connection`.

    A connection is accepted as plain TCP with reading paused, and counted as pending until it
    has done TLS and proved its key (`handshake_timeout_s` for both): beyond `max_pending` a new
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
        self._max_pending = limits.fast_lane_max_pending
        self._failures = RateLimitedLog(
            log, limits.fast_lane_log_lines_per_s, "fast-lane connections refused or failed"
        )
        self._context: ssl.SSLContext | None = None
        self._server: asyncio.Server | None = None
        self._group: asyncio.TaskGroup | None = None  # one task per connection, see `run()`
        self._early: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.pending = 0  # connections accepted, not yet authenticated (tests read it)
        self.most_pending = 0  # the highest `pending` seen
        self.refused = 0  # connections closed unread because `max_pending` were pending

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
            async with asyncio.TaskGroup() as group:
                self._group = group
                for reader, writer in self._early:
                    group.create_task(self._serve(reader, writer))
                self._early.clear()
                try:
                    await asyncio.Event().wait()  # until cancelled
                finally:
                    self._stop_listening()  # no new connection while the group ends
        finally:
            self._group = None
            self._stop_listening()
            self._failures.flush()

    def _stop_listening(self) -> None:
        if self._server is not None:
            self._server.close()

    def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Called from connection_made, before the transport reads: nothing is read until the
        # TLS layer is in place (or the connection is closed unread).
        transport = writer.transport
        if isinstance(transport, asyncio.ReadTransport):  # a socket transport: always
            transport.pause_reading()
        if self.pending >= self._max_pending:
            self.refused += 1
            self._failures.log(
                logging.WARNING,
                "fast lane: refused a connection from %s: %d handshakes pending (the most)",
                _peer_addr(writer),
                self.pending,
                event="fast_lane_refused",
                reason="too_many_pending",
            )
            writer.transport.abort()
            return
        self._count_pending(+1)
        if self._group is None:
            self._early.append((reader, writer))  # run() serves them when it starts
            return
        try:
            self._group.create_task(self._serve(reader, writer))
        except RuntimeError:  # the group is ending: so is this server
            self._count_pending(-1)
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
                self._count_pending(-1)
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
            async with asyncio.timeout(timeout_s):
                await writer.start_tls(self._context, ssl_handshake_timeout=timeout_s)
                set_no_delay(writer)
                return await self._authenticate(reader, writer, peer)
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
        nonce = os.urandom(NONCE_BYTES)
        writer.write(MAGIC + bytes([VERSION]) + nonce)
        proof = await reader.readexactly(1 + KEY_BYTES + SIGNATURE_BYTES + 1)
        version, purpose = proof[0], proof[-1]
        client = NodeId(proof[1 : 1 + KEY_BYTES].hex())
        signature = proof[1 + KEY_BYTES : -1]
        refusal = self._check(version, client, signature, nonce, purpose)
        writer.write(bytes([refusal or ACCEPTED]))
        await writer.drain()
        if refusal is not None:
            self._failures.log(
                logging.WARNING,
                "fast lane: refused %s from %s (%s)",
                short_id(client),
                peer,
                refusal.name,
                event="fast_lane_refused",
                reason=refusal.name,
            )
            return None
        return client, StreamType(purpose)

    def _check(
        self, version: int, client: NodeId, signature: bytes, nonce: bytes, purpose: int
    ) -> RefuseCode | None:
        if version != VERSION:
            return RefuseCode.VERSION_MISMATCH
        data = signed_data(self._identity.node_id, client, nonce, purpose)
        if not verify_signature(client, data, signature):
            return RefuseCode.BAD_SIGNATURE
        if not self._is_allowed(client):
            return RefuseCode.KEY_MISMATCH
        if purpose not in self._purposes:
            return RefuseCode.UNKNOWN_STREAM
        return None


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
            _pin(writer, host, port, expected)
            await _prove(reader, writer, identity, expected, purpose, f"{host}:{port}")
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        if writer is not None:
            await close_and_wait(writer)
        raise PeerUnavailable(f"no fast lane to {host}:{port} ({exc!r})") from exc
    except ProtocolError:
        assert writer is not None
        await close_and_wait(writer)
        raise
    return reader, writer, expected


def _pin(writer: asyncio.StreamWriter, host: str, port: int, expected: NodeId) -> None:
    actual = _peer_node_id(writer)
    if actual != expected:
        raise ProtocolError(
            f"fast lane {host}:{port} presented key {short_id(actual or NodeId('none'))}, "
            f"expected {short_id(expected)}: not the node gossip named",
            RefuseCode.KEY_MISMATCH,
        )


async def _prove(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: NodeIdentity,
    server: NodeId,
    purpose: StreamType,
    where: str,
) -> None:
    challenge = await reader.readexactly(len(MAGIC) + 1 + NONCE_BYTES)
    if challenge[: len(MAGIC)] != MAGIC or challenge[len(MAGIC)] != VERSION:
        raise ProtocolError(
            f"fast lane {where} speaks another protocol or version", RefuseCode.VERSION_MISMATCH
        )
    nonce = challenge[len(MAGIC) + 1 :]
    signature = identity.sign(signed_data(server, identity.node_id, nonce, purpose))
    writer.write(bytes([VERSION]) + identity.public_key_bytes + signature + bytes([purpose]))
    status = (await reader.readexactly(1))[0]
    if status != ACCEPTED:
        try:
            reason = RefuseCode(status).name
        except ValueError:
            reason = f"code {status}"
        raise ProtocolError(f"fast lane {where} refused us ({reason})", status)


def _peer_addr(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    return f"{peer[0]}:{peer[1]}" if peer else "?"
