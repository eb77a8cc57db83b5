"""An end-to-end sealed byte stream between two nodes, for streams a third node relays.

A relay (`net/relay.py`) splices two streams of its own: it could read, change, cut or forge
what passes. So the two ends run their own handshake through it and seal every byte:

  initiator → responder: b"MLSE" | version (1) | ephemeral X25519 key (32) | nonce (32)
  responder → initiator: ephemeral X25519 key (32) | nonce (32) | signature (64) | mac (32)
  initiator → responder: signature (64) | mac (32)

Each signature is an Ed25519 signature by the side's node key, and each mac an HMAC-SHA256
keyed by the mesh secret, over a side label and the transcript (both node ids, the purpose,
both ephemeral keys, both nonces): each end proves its node key and its membership of the
mesh, fresh for this stream, and the relay can forge neither. The X25519 shared secret, through
HKDF-SHA256 salted with the transcript's hash, gives one ChaCha20-Poly1305 key per direction.
Frames are `u32 length | ciphertext` of `kind (1) | data`, the nonce a per-direction counter:
a reordered, replayed, dropped or altered frame fails to open. `kind` END marks the end of the
sender's bytes, so a relay cutting the stream short is an error, not a clean end. Raises only
`StreamReset` (a failed handshake included) and cancellation.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import os
import struct

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from mesh_llm.core.types import NodeId
from mesh_llm.errors import StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity, verify_signature
from mesh_llm.net.streams import READ_CHUNK_BYTES, ByteStream, Lane

MAGIC = b"MLSE"
VERSION = 1
LABEL = b"mesh-llm sealed stream v1\x00"
KEY_BYTES = NONCE_BYTES = 32
SIGNATURE_BYTES = 64
MAC_BYTES = 32
MAX_FRAME_PLAINTEXT = 64 * 1024
MIN_FRAME_CIPHERTEXT = 1 + 16  # kind byte + Poly1305 tag
MAX_FRAME_CIPHERTEXT = MAX_FRAME_PLAINTEXT + MIN_FRAME_CIPHERTEXT
_DATA, _END = 0, 1
_LENGTH = struct.Struct(">I")


def _transcript(
    initiator: NodeId, responder: NodeId, purpose: int, keys: tuple[bytes, bytes], nonces: bytes
) -> bytes:
    return b"".join(
        (LABEL, bytes.fromhex(initiator), bytes.fromhex(responder), bytes([purpose]), *keys, nonces)
    )


def _proof(identity: NodeIdentity, mesh: MeshSecret, side: bytes, transcript: bytes) -> bytes:
    data = side + transcript
    return identity.sign(data) + hmac.new(mesh.secret, data, hashlib.sha256).digest()


def _check(node: NodeId, mesh: MeshSecret, side: bytes, transcript: bytes, proof: bytes) -> None:
    data = side + transcript
    signature, mac = proof[:SIGNATURE_BYTES], proof[SIGNATURE_BYTES:]
    if not verify_signature(node, data, signature):
        raise StreamReset(f"sealed stream: the other end does not hold the key of {node[:10]}")
    if not hmac.compare_digest(mac, hmac.new(mesh.secret, data, hashlib.sha256).digest()):
        raise StreamReset("sealed stream: the other end does not hold the mesh secret")


def _raw(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _keys(own: X25519PrivateKey, other: bytes, transcript: bytes) -> tuple[bytes, bytes]:
    """(initiator → responder key, responder → initiator key)."""
    try:
        shared = own.exchange(X25519PublicKey.from_public_bytes(other))
    except ValueError as exc:
        raise StreamReset(f"sealed stream: bad ephemeral key ({exc})") from exc
    material = HKDF(
        algorithm=hashes.SHA256(),
        length=64,
        salt=hashlib.sha256(transcript).digest(),
        info=b"mesh-llm sealed stream keys",
    ).derive(shared)
    return material[:32], material[32:]


async def seal_initiator(
    stream: ByteStream,
    identity: NodeIdentity,
    mesh: MeshSecret,
    responder: NodeId,
    purpose: int,
) -> SealedStream:
    """Run the initiator's side of the handshake on `stream` to `responder`."""
    ephemeral, nonce = X25519PrivateKey.generate(), os.urandom(NONCE_BYTES)
    stream.write(MAGIC + bytes([VERSION]) + _raw(ephemeral) + nonce)
    reply = await stream.read_exactly(KEY_BYTES + NONCE_BYTES + SIGNATURE_BYTES + MAC_BYTES)
    their_key, their_nonce = reply[:KEY_BYTES], reply[KEY_BYTES : KEY_BYTES + NONCE_BYTES]
    transcript = _transcript(
        identity.node_id, responder, purpose, (_raw(ephemeral), their_key), nonce + their_nonce
    )
    _check(responder, mesh, b"R", transcript, reply[KEY_BYTES + NONCE_BYTES :])
    stream.write(_proof(identity, mesh, b"I", transcript))
    send_key, receive_key = _keys(ephemeral, their_key, transcript)
    return SealedStream(stream, send_key, receive_key)


async def seal_responder(
    stream: ByteStream,
    identity: NodeIdentity,
    mesh: MeshSecret,
    initiator: NodeId,
    purpose: int,
) -> SealedStream:
    """Run the responder's side of the handshake on `stream` from `initiator`."""
    hello = await stream.read_exactly(len(MAGIC) + 1 + KEY_BYTES + NONCE_BYTES)
    if hello[: len(MAGIC)] != MAGIC or hello[len(MAGIC)] != VERSION:
        raise StreamReset("sealed stream: not a sealed-stream hello (or another version)")
    their_key, their_nonce = hello[len(MAGIC) + 1 : -NONCE_BYTES], hello[-NONCE_BYTES:]
    ephemeral, nonce = X25519PrivateKey.generate(), os.urandom(NONCE_BYTES)
    transcript = _transcript(
        initiator, identity.node_id, purpose, (their_key, _raw(ephemeral)), their_nonce + nonce
    )
    stream.write(_raw(ephemeral) + nonce + _proof(identity, mesh, b"R", transcript))
    _check(
        initiator, mesh, b"I", transcript, await stream.read_exactly(SIGNATURE_BYTES + MAC_BYTES)
    )
    receive_key, send_key = _keys(ephemeral, their_key, transcript)
    return SealedStream(stream, send_key, receive_key)


class SealedStream:
    """A `ByteStream` whose bytes are sealed end to end over another (relayed) one."""

    lane: Lane = "relay"

    def __init__(self, inner: ByteStream, send_key: bytes, receive_key: bytes) -> None:
        self._inner = inner
        self._send = ChaCha20Poly1305(send_key)
        self._receive = ChaCha20Poly1305(receive_key)
        self._sent = self._received = 0
        self._buffer = bytearray()
        self._ended = False  # the other end's END frame arrived
        self._closed = False  # we sent our END frame

    async def read(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        while not self._buffer and not self._ended:
            await self._read_frame()
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return data

    async def read_exactly(self, count: int) -> bytes:
        out = bytearray()
        while len(out) < count:
            chunk = await self.read(count - len(out))
            if not chunk:
                raise StreamReset(f"stream ended after {len(out)} of {count} bytes")
            out += chunk
        return bytes(out)

    def write(self, data: bytes) -> None:
        if self._closed:
            raise StreamReset("sealed stream already ended")
        for start in range(0, len(data), MAX_FRAME_PLAINTEXT):
            self._write_frame(_DATA, data[start : start + MAX_FRAME_PLAINTEXT])

    async def drain(self) -> None:
        await self._inner.drain()

    def is_usable(self) -> bool:
        return not self._ended and not self._closed and self._inner.is_usable()

    def close(self) -> None:
        if not self._closed:
            with contextlib.suppress(StreamReset):  # the inner stream is gone already
                self._write_frame(_END, b"")
            self._closed = True
        self._inner.close()

    def abort(self) -> None:
        self._closed = True
        self._inner.abort()

    async def wait_closed(self) -> None:
        await self._inner.wait_closed()

    def _write_frame(self, kind: int, data: bytes) -> None:
        nonce = self._sent.to_bytes(12, "big")
        self._sent += 1
        sealed = self._send.encrypt(nonce, bytes([kind]) + data, None)
        self._inner.write(_LENGTH.pack(len(sealed)) + sealed)

    async def _read_frame(self) -> None:
        length_bytes = await self._read_or_end(_LENGTH.size)
        (length,) = _LENGTH.unpack(length_bytes)
        if not MIN_FRAME_CIPHERTEXT <= length <= MAX_FRAME_CIPHERTEXT:
            raise StreamReset(f"sealed stream: bad frame length {length}")
        sealed = await self._inner.read_exactly(length)
        nonce = self._received.to_bytes(12, "big")
        self._received += 1
        try:
            plain = self._receive.decrypt(nonce, sealed, None)
        except InvalidTag as exc:
            raise StreamReset("sealed stream: a frame failed authentication") from exc
        if plain[0] == _END:
            self._ended = True
        else:
            self._buffer += plain[1:]

    async def _read_or_end(self, count: int) -> bytes:
        first = await self._inner.read(count)
        if not first:
            raise StreamReset("sealed stream: cut before its end (the relay or a peer went)")
        if len(first) < count:
            first += await self._inner.read_exactly(count - len(first))
        return first
