"""`ByteStream`: one ordered, reliable byte stream to a peer, whatever carries it.

Two lanes carry streams between nodes: the fast lane (one TCP + TLS 1.3 connection per
stream, `net/fastlane.py`) and QUIC (one stream of the peer's QUIC connection, `net/quic.py`).
`TcpByteStream` and `QuicByteStream` give both the same surface, so the RPC relay and the HTTP
framing above them never ask which lane they are on; `lane` names it for status only. Errors
of either transport come out as `StreamReset` (a `MeshError`): translated here, at the
boundary. Writes are bounded by `drain()` (the kernel's socket buffer, or our own limit of
unacknowledged QUIC bytes: aioquic has no backpressure). Imports no aioquic: a QUIC stream is
a `QuicStream` of `net/quic_stream.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Literal, Protocol

from mesh_llm.errors import StreamReset
from mesh_llm.net.fastlane import close_and_wait
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.wire.messages import RefuseCode

Lane = Literal["fast", "quic", "relay"]
READ_CHUNK_BYTES = 256 * 1024
# A QUIC writer waits while more than this is written but unacknowledged. Below the receiver's
# per-stream buffer cap (quic_stream.MAX_STREAM_BUFFER_BYTES), which resets a stream that
# overflows.
QUIC_MAX_UNSENT_BYTES = 2 * 1024 * 1024


class ByteStream(Protocol):
    """A byte stream to a peer; every method raises only `StreamReset` (and cancellation)."""

    lane: Lane

    async def read(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        """Up to `max_bytes` as they arrive; b"" at the end of the stream."""
        ...

    async def read_exactly(self, count: int) -> bytes:
        """Exactly `count` bytes; `StreamReset` if the stream ends first."""
        ...

    def write(self, data: bytes) -> None: ...

    async def drain(self) -> None:
        """Wait until the written bytes are within the lane's buffer limit."""
        ...

    def is_usable(self) -> bool:
        """Neither ended nor failed: another exchange may follow on it."""
        ...

    def close(self) -> None:
        """End our side; everything written is still delivered."""
        ...

    def abort(self) -> None:
        """Break the stream off: the peer sees it fail (its request is cancelled)."""
        ...

    async def wait_closed(self) -> None: ...


class TcpByteStream:
    """A fast-lane connection (asyncio streams over TLS) as a `ByteStream`."""

    lane: Lane = "fast"

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer

    async def read(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        try:
            return await self._reader.read(max_bytes)
        except OSError as exc:
            raise StreamReset(f"fast lane connection failed: {exc!r}") from exc

    async def read_exactly(self, count: int) -> bytes:
        try:
            return await self._reader.readexactly(count)
        except asyncio.IncompleteReadError as exc:
            raise StreamReset(f"stream ended after {len(exc.partial)} of {count} bytes") from exc
        except OSError as exc:
            raise StreamReset(f"fast lane connection failed: {exc!r}") from exc

    def write(self, data: bytes) -> None:
        if self._writer.is_closing():
            raise StreamReset("fast lane connection closed")
        self._writer.write(data)

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except OSError as exc:
            raise StreamReset(f"fast lane connection failed: {exc!r}") from exc

    def is_usable(self) -> bool:
        return not self._writer.is_closing() and not self._reader.at_eof()

    def close(self) -> None:
        # TLS over asyncio cannot half-close: ending our side ends the connection.
        self._writer.close()

    def abort(self) -> None:
        self._writer.close()

    async def wait_closed(self) -> None:
        await close_and_wait(self._writer)


class QuicByteStream:
    """One QUIC stream as a `ByteStream` (`QuicStream` already raises `StreamReset`)."""

    lane: Lane = "quic"

    def __init__(self, stream: QuicStream) -> None:
        self._stream = stream

    async def read(self, max_bytes: int = READ_CHUNK_BYTES) -> bytes:
        return await self._stream.read(max_bytes)

    async def read_exactly(self, count: int) -> bytes:
        return await self._stream.read_exactly(count)

    def write(self, data: bytes) -> None:
        self._stream.write(data)

    async def drain(self) -> None:
        await self._stream.wait_writable(QUIC_MAX_UNSENT_BYTES)

    def is_usable(self) -> bool:
        return self._stream.is_usable()

    def close(self) -> None:
        with contextlib.suppress(StreamReset):  # the connection is gone: nothing to end
            self._stream.write_eof()

    def abort(self) -> None:
        self._stream.reset(RefuseCode.SHUTTING_DOWN)

    async def wait_closed(self) -> None:
        """Nothing to wait for: quic.py forgets the stream once both directions ended."""
