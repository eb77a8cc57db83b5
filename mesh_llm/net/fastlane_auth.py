"""Authentication of a fast-lane connection: both node keys proven over TCP + TLS 1.3.

Python's `ssl` has no verification callback: a server with `CERT_OPTIONAL` or
`CERT_REQUIRED` rejects any client certificate that does not chain to a CA it loaded, and a
peer's self-signed certificate cannot be known in advance (it is made per process), while a
server with `CERT_NONE` does not ask for a client certificate at all. So:

- The server proves its key in the TLS handshake (TLS 1.3 CertificateVerify signs the
  transcript with the key in its certificate, which is the node key); the client uses
  `CERT_NONE` and pins it after the handshake (`pin_server`): `node_id_from_certificate` of
  `getpeercert(binary_form=True)` must equal the node id it expects (from gossip).
- The client proves its key inside the encrypted channel: the server sends a fresh 32-byte
  nonce; the client answers with its public key and an Ed25519 signature over a context label,
  the server's key, its own key, the nonce and the purpose byte (`signed_data`). Binding the
  server's key stops a malicious server from relaying the proof to another node; the nonce
  makes it fresh (TLS 1.3 gives Python no exporter or channel binding to sign instead). The
  server checks the signature, asks `is_allowed(node_id)`, and answers one status byte
  (0 = accepted, else a `RefuseCode`) before any payload flows (`challenge_client`; the client
  side is `prove_client`).

Wire format after the TLS handshake:
  server → client: b"MLFL" | version (1) | nonce (32)
  client → server: version (1) | client public key (32) | signature (64) | purpose (1)
  server → client: status (1)
A client the server does not allow is refused with `KEY_MISMATCH`, an unsupported purpose with
`UNKNOWN_STREAM`, a bad signature with `BAD_SIGNATURE`, another version with
`VERSION_MISMATCH`. The client raises `ProtocolError` for a wrong server key or a refusal.
"""

from __future__ import annotations

import asyncio
import os
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import IdentityError, ProtocolError
from mesh_llm.identity import (
    NodeIdentity,
    make_self_signed_certificate,
    node_id_from_certificate,
    verify_signature,
)
from mesh_llm.wire.messages import RefuseCode, StreamType

MAGIC = b"MLFL"
VERSION = 1
NONCE_BYTES = 32
KEY_BYTES = 32
SIGNATURE_BYTES = 64
ACCEPTED = 0
SIGNATURE_CONTEXT = b"mesh-llm fast lane v1\x00"


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


# -- the server's side -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyProof:
    """The client's answer to the nonce, as read off the wire."""

    version: int
    client: NodeId
    signature: bytes
    purpose: int

    @classmethod
    def parse(cls, data: bytes) -> KeyProof:
        return cls(
            version=data[0],
            client=NodeId(data[1 : 1 + KEY_BYTES].hex()),
            signature=data[1 + KEY_BYTES : -1],
            purpose=data[-1],
        )


async def challenge_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: NodeIdentity,
    is_allowed: Callable[[NodeId], bool],
    purposes: frozenset[StreamType],
) -> tuple[KeyProof, RefuseCode | None]:
    """Send the nonce, check the client's proof, answer the status byte: the proof and the
    refusal sent (None: accepted)."""
    nonce = os.urandom(NONCE_BYTES)
    writer.write(MAGIC + bytes([VERSION]) + nonce)
    proof = KeyProof.parse(await reader.readexactly(1 + KEY_BYTES + SIGNATURE_BYTES + 1))
    refusal = _check(proof, nonce, identity, is_allowed, purposes)
    writer.write(bytes([refusal or ACCEPTED]))
    await writer.drain()
    return proof, refusal


def _check(
    proof: KeyProof,
    nonce: bytes,
    identity: NodeIdentity,
    is_allowed: Callable[[NodeId], bool],
    purposes: frozenset[StreamType],
) -> RefuseCode | None:
    if proof.version != VERSION:
        return RefuseCode.VERSION_MISMATCH
    data = signed_data(identity.node_id, proof.client, nonce, proof.purpose)
    if not verify_signature(proof.client, data, proof.signature):
        return RefuseCode.BAD_SIGNATURE
    if not is_allowed(proof.client):
        return RefuseCode.KEY_MISMATCH
    if proof.purpose not in purposes:
        return RefuseCode.UNKNOWN_STREAM
    return None


# -- the client's side -------------------------------------------------------------------------


def peer_node_id(writer: asyncio.StreamWriter) -> NodeId | None:
    """The node id of the certificate the TLS peer presented (None: none, or not a node key)."""
    ssl_object = writer.get_extra_info("ssl_object")
    certificate = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
    if not certificate:
        return None
    try:
        return node_id_from_certificate(certificate)
    except IdentityError:
        return None


def pin_server(writer: asyncio.StreamWriter, host: str, port: int, expected: NodeId) -> None:
    """Raise `ProtocolError(KEY_MISMATCH)` unless the server's certificate carries `expected`."""
    actual = peer_node_id(writer)
    if actual != expected:
        raise ProtocolError(
            f"fast lane {host}:{port} presented key {short_id(actual or NodeId('none'))}, "
            f"expected {short_id(expected)}: not the node gossip named",
            RefuseCode.KEY_MISMATCH,
        )


async def prove_client(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    identity: NodeIdentity,
    server: NodeId,
    purpose: StreamType,
    where: str,
) -> None:
    """Answer the server's nonce with our key proof; raises `ProtocolError` if refused."""
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
