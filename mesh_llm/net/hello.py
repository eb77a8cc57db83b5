"""The hello: the admission exchange that opens every control stream.

Dialer → `Hello(version, node id, mesh id, nonce)`; listener → `HelloReply` with its own nonce,
an Ed25519 signature over the transcript (both hellos, both nonces) and an HMAC of it keyed by
the mesh secret; dialer → `HelloFinish` with its own signature and HMAC; listener → `Welcome`
or `Refused(code, reason)`. Each side thus proves possession of its node key and knowledge of
the mesh secret; fresh nonces on both sides make a replayed hello useless. The listener reveals
nothing of the mesh to a dialer that fails. `FramedChannel` carries length-prefixed messages on
a `QuicStream`. Raises `AdmissionRefused` (with a `RefuseCode`) on any failure.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct
from dataclasses import dataclass
from typing import TypeVar

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import AdmissionRefused, DecodeError
from mesh_llm.identity import MeshSecret, NodeIdentity, is_node_id, verify_signature
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.wire.codec import FrameDecoder, encode_frame
from mesh_llm.wire.messages import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Hello,
    HelloFinish,
    HelloReply,
    Message,
    RefuseCode,
    Refused,
    Welcome,
)

_M = TypeVar("_M", bound=Message)
TRANSCRIPT_LABEL = b"mesh-llm admission v1\x00"
READ_CHUNK_BYTES = 65536


class FramedChannel:
    """Length-prefixed messages over one QUIC stream."""

    def __init__(self, stream: QuicStream) -> None:
        self.stream = stream
        self._decoder = FrameDecoder()
        self._ready: list[Message] = []

    def send(self, message: Message) -> None:
        self.stream.write(encode_frame(message))

    async def receive(self) -> Message | None:
        """The next message, or None at a clean end of stream. Raises `DecodeError`."""
        while not self._ready:
            data = await self.stream.read(READ_CHUNK_BYTES)
            if not data:
                if self._decoder.pending_bytes:
                    raise DecodeError("stream ended inside a frame")
                return None
            self._ready.extend(self._decoder.feed(data))
        return self._ready.pop(0)


@dataclass(frozen=True, slots=True)
class Admitted:
    node_id: NodeId
    client: bool


def _transcript(hello: Hello, reply: HelloReply) -> bytes:
    parts = [
        struct.pack(">II", hello.version, reply.version),
        hello.node_id.encode(),
        hello.mesh_id.encode(),
        hello.nonce,
        b"\x01" if hello.client else b"\x00",
        reply.node_id.encode(),
        reply.mesh_id.encode(),
        reply.nonce,
    ]
    return TRANSCRIPT_LABEL + b"".join(struct.pack(">I", len(p)) + p for p in parts)


def _proofs(
    identity: NodeIdentity, mesh: MeshSecret, side: bytes, transcript: bytes
) -> tuple[bytes, bytes]:
    data = side + transcript
    return identity.sign(data), hmac.new(mesh.secret, data, hashlib.sha256).digest()


def _check(
    node_id: str, mesh: MeshSecret, side: bytes, transcript: bytes, signature: bytes, mac: bytes
) -> None:
    data = side + transcript
    expected_mac = hmac.new(mesh.secret, data, hashlib.sha256).digest()
    if not hmac.compare_digest(expected_mac, mac):
        raise AdmissionRefused(
            "wrong mesh secret: the invite token is for another mesh or is outdated",
            RefuseCode.BAD_SECRET,
        )
    if not verify_signature(NodeId(node_id), data, signature):
        raise AdmissionRefused(
            "bad signature: the peer does not hold its node key", RefuseCode.BAD_SIGNATURE
        )


async def _expect(channel: FramedChannel, kind: type[_M]) -> _M:
    try:
        message = await channel.receive()
    except DecodeError as exc:
        raise AdmissionRefused(f"malformed hello: {exc}", RefuseCode.PROTOCOL_ERROR) from exc
    if isinstance(message, Refused):
        raise AdmissionRefused(f"refused by peer: {message.reason}", message.code)
    if not isinstance(message, kind):
        got = type(message).__name__ if message is not None else "end of stream"
        raise AdmissionRefused(f"expected {kind.__name__}, got {got}", RefuseCode.PROTOCOL_ERROR)
    return message


def _check_peer_fields(version: int, node_id: str, mesh_id: str, mesh: MeshSecret) -> None:
    if version != PROTOCOL_VERSION:
        raise AdmissionRefused(
            f"protocol version mismatch: peer speaks {version}, this node speaks "
            f"{PROTOCOL_VERSION}; upgrade the older mesh-llm",
            RefuseCode.VERSION_MISMATCH,
        )
    if not is_node_id(node_id):
        raise AdmissionRefused("malformed node id in hello", RefuseCode.PROTOCOL_ERROR)
    if mesh_id != mesh.mesh_id:
        raise AdmissionRefused("the peer belongs to another mesh", RefuseCode.WRONG_MESH)


async def admit_inbound(
    channel: FramedChannel, identity: NodeIdentity, mesh: MeshSecret
) -> Admitted:
    """Listener side. Sends `Refused` to the dialer before raising `AdmissionRefused`."""
    try:
        hello = await _expect(channel, Hello)
        _check_peer_fields(hello.version, hello.node_id, hello.mesh_id, mesh)
        if hello.node_id == identity.node_id:
            raise AdmissionRefused(
                "the peer uses this node's own key: two nodes started with the same "
                "~/.mesh-llm/key (use MESH_LLM_EPHEMERAL_KEY=1 for extra nodes)",
                RefuseCode.DUPLICATE_NODE,
            )
        head = HelloReply(
            PROTOCOL_VERSION, identity.node_id, mesh.mesh_id, os.urandom(NONCE_BYTES), b"", b""
        )
        transcript = _transcript(hello, head)
        signature, mac = _proofs(identity, mesh, b"L", transcript)
        channel.send(
            HelloReply(head.version, head.node_id, head.mesh_id, head.nonce, signature, mac)
        )
        finish = await _expect(channel, HelloFinish)
        _check(hello.node_id, mesh, b"D", transcript, finish.signature, finish.mac)
    except AdmissionRefused as exc:
        channel.send(Refused(exc.code, str(exc)))
        raise
    channel.send(Welcome())
    return Admitted(NodeId(hello.node_id), hello.client)


async def admit_outbound(
    channel: FramedChannel,
    identity: NodeIdentity,
    mesh: MeshSecret,
    *,
    expected: NodeId | None,
    client: bool = False,
) -> NodeId:
    """Dialer side; returns the admitted peer's node id. Raises `AdmissionRefused`."""
    hello = Hello(PROTOCOL_VERSION, identity.node_id, mesh.mesh_id, os.urandom(NONCE_BYTES), client)
    channel.send(hello)
    reply = await _expect(channel, HelloReply)
    _check_peer_fields(reply.version, reply.node_id, reply.mesh_id, mesh)
    if expected is not None and reply.node_id != expected:
        raise AdmissionRefused(
            f"peer claims {short_id(NodeId(reply.node_id))}, expected {short_id(expected)}",
            RefuseCode.KEY_MISMATCH,
        )
    transcript = _transcript(hello, reply)
    _check(reply.node_id, mesh, b"L", transcript, reply.signature, reply.mac)
    signature, mac = _proofs(identity, mesh, b"D", transcript)
    channel.send(HelloFinish(signature, mac))
    await _expect(channel, Welcome)
    return NodeId(reply.node_id)
