"""The sealed stream a relay carries: its handshake proves both ends, and a relay that reads,
changes, reorders or cuts the bytes is caught."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mesh_llm.errors import StreamReset
from mesh_llm.identity import NodeIdentity, new_mesh
from mesh_llm.net.sealed import MAX_FRAME_PLAINTEXT, SealedStream, seal_initiator, seal_responder
from mesh_llm.net.streams import READ_CHUNK_BYTES, Lane
from mesh_llm.wire.messages import StreamType

HTTP = int(StreamType.HTTP)
Tamper = Callable[[bytes], bytes]


class PipeEnd:
    """One end of an in-memory byte pipe (a `ByteStream`); `tamper` rewrites what it sends."""

    lane: Lane = "quic"

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.other: PipeEnd | None = None
        self.buffer = bytearray()
        self.eof = False
        self.tamper: Tamper = lambda data: data
        self.written: list[bytes] = []

    async def read(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        while not self.buffer and not self.eof:
            chunk = await self.inbox.get()
            if not chunk:
                self.eof = True
            self.buffer += chunk
        data = bytes(self.buffer[:max_bytes])
        del self.buffer[:max_bytes]
        return data

    async def read_exactly(self, count: int) -> bytes:
        out = b""
        while len(out) < count:
            chunk = await self.read(count - len(out))
            if not chunk:
                raise StreamReset("ended early")
            out += chunk
        return out

    def write(self, data: bytes) -> None:
        assert self.other is not None
        data = self.tamper(data)
        self.written.append(data)
        if data:
            self.other.inbox.put_nowait(data)

    async def drain(self) -> None:
        await asyncio.sleep(0)

    def is_usable(self) -> bool:
        return not self.eof

    def close(self) -> None:
        assert self.other is not None
        self.other.inbox.put_nowait(b"")

    def abort(self) -> None:
        self.close()

    async def wait_closed(self) -> None:
        return None


def pipe() -> tuple[PipeEnd, PipeEnd]:
    a, b = PipeEnd(), PipeEnd()
    a.other, b.other = b, a
    return a, b


async def sealed_pair(
    initiator_mesh_secret: bytes | None = None,
) -> tuple[SealedStream, SealedStream, PipeEnd, PipeEnd]:
    mesh = new_mesh()
    alice, bob = NodeIdentity.generate(), NodeIdentity.generate()
    near, far = pipe()
    own_mesh = (
        mesh if initiator_mesh_secret is None else type(mesh)(mesh.mesh_id, initiator_mesh_secret)
    )
    a, b = await asyncio.gather(
        seal_initiator(near, alice, own_mesh, bob.node_id, HTTP),
        seal_responder(far, bob, mesh, alice.node_id, HTTP),
    )
    return a, b, near, far


async def test_bytes_cross_both_ways_and_end_cleanly() -> None:
    a, b, near, _ = await sealed_pair()
    big = bytes(range(256)) * (3 * MAX_FRAME_PLAINTEXT // 256 + 7)
    a.write(b"hello " + big)
    b.write(b"back")
    assert await b.read_exactly(6 + len(big)) == b"hello " + big
    assert await a.read_exactly(4) == b"back"
    assert b"hello" not in b"".join(near.written), "the relay sees only sealed frames"
    a.close()
    assert await b.read() == b""  # the END frame: a clean end
    assert a.lane == "relay"


async def test_a_wrong_mesh_secret_fails_the_handshake() -> None:
    with pytest.raises(StreamReset, match="mesh secret"):
        await sealed_pair(initiator_mesh_secret=b"\x00" * 32)


async def test_an_impostor_cannot_answer_for_the_expected_node() -> None:
    mesh = new_mesh()
    alice, bob, mallory = (NodeIdentity.generate() for _ in range(3))
    near, far = pipe()
    responder = asyncio.ensure_future(seal_responder(far, mallory, mesh, alice.node_id, HTTP))
    with pytest.raises(StreamReset, match="key of"):
        await seal_initiator(near, alice, mesh, bob.node_id, HTTP)
    responder.cancel()
    with pytest.raises((asyncio.CancelledError, StreamReset)):
        await responder


async def test_a_changed_byte_is_caught() -> None:
    a, b, near, _ = await sealed_pair()
    near.tamper = lambda data: data[:-1] + bytes([data[-1] ^ 1])
    a.write(b"transfer 10 tokens")
    with pytest.raises(StreamReset, match="authentication"):
        await b.read()


async def test_a_replayed_frame_is_caught() -> None:
    a, b, near, far = await sealed_pair()
    a.write(b"once")
    assert await b.read() == b"once"
    far.inbox.put_nowait(near.written[-1])  # the relay sends the same frame again
    with pytest.raises(StreamReset, match="authentication"):
        await b.read()


async def test_a_stream_cut_short_is_an_error_not_an_end() -> None:
    a, b, near, _ = await sealed_pair()
    a.write(b"partial")
    assert await b.read() == b"partial"
    near.close()  # the relay ends the stream without the sender's END frame
    with pytest.raises(StreamReset, match="cut"):
        await b.read()
