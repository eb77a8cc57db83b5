"""One bidirectional QUIC stream as the rest of the node sees it: `QuicStream`.

aioquic gives no backpressure and no per-stream readers, so this class keeps its own receive
buffer, bounded at `MAX_STREAM_BUFFER_BYTES` (a peer that overflows it has the stream reset),
readers that wake when the stream is reset or its connection closes (they raise `StreamReset`,
never hang), and a writer-side wait on the bytes still unacknowledged. It talks to its
connection only through `StreamConnection` (send, count unsent bytes, reset), so it imports no
aioquic; the connection (`net/quic.py`) feeds it received data and failures.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from mesh_llm.errors import StreamReset
from mesh_llm.wire.messages import RefuseCode

MAX_STREAM_BUFFER_BYTES = 4 * 1024 * 1024


class StreamConnection(Protocol):
    """What a stream needs of its QUIC connection (`QuicPeerConnection`)."""

    @property
    def is_closed(self) -> bool: ...

    def _send_stream_data(self, stream_id: int, data: bytes, end_stream: bool) -> None: ...

    def _unsent_bytes(self, stream_id: int) -> int: ...

    def _reset_stream(self, stream_id: int, code: int) -> None: ...


class QuicStream:
    """One bidirectional stream: bounded receive buffer, readers that never hang on reset."""

    def __init__(self, connection: StreamConnection, stream_id: int) -> None:
        self._connection = connection
        self.stream_id = stream_id
        self._buffer = bytearray()
        self._eof = False
        self._error: BaseException | None = None
        self._readable = asyncio.Event()
        self._failed = asyncio.Event()
        self._write_closed = False
        self._stopped = False  # the peer sent STOP_SENDING: writing more is an error

    # -- fed by the connection ---------------------------------------------------------

    def _feed(self, data: bytes, end_stream: bool) -> None:
        if len(self._buffer) + len(data) > MAX_STREAM_BUFFER_BYTES:
            self.reset(RefuseCode.PROTOCOL_ERROR)
            self._fail(StreamReset("receive buffer limit exceeded"))
            return
        self._buffer += data
        self._eof = self._eof or end_stream
        self._readable.set()

    def _fail(self, error: BaseException) -> None:
        if self._error is None:
            self._error = error
        self._readable.set()
        self._failed.set()

    def _peer_stopped(self, error: BaseException) -> None:
        """The peer sent STOP_SENDING: no more writing, readers and waiters fail."""
        self._stopped = self._write_closed = True
        self._fail(error)

    def _is_done(self) -> bool:
        """Both directions ended and everything received was read: the connection forgets it."""
        return self._eof and self._write_closed and not self._buffer

    async def wait_failed(self) -> BaseException:
        """Wait until the stream is reset by the peer or its connection closes."""
        await self._failed.wait()
        assert self._error is not None
        return self._error

    # -- reading ----------------------------------------------------------------------------

    async def read(self, max_bytes: int = 65536) -> bytes:
        """Up to `max_bytes`; b"" at end of stream. Raises `StreamReset`."""
        while not self._buffer and not self._eof:
            if self._error is not None:
                raise self._error
            self._readable.clear()
            await self._readable.wait()
        if self._error is not None and not self._buffer:
            raise self._error
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return data

    async def read_exactly(self, count: int) -> bytes:
        """Exactly `count` bytes; raises `StreamReset` on reset or early end."""
        out = bytearray()
        while len(out) < count:
            chunk = await self.read(count - len(out))
            if not chunk:
                raise StreamReset(f"stream ended after {len(out)} of {count} bytes")
            out += chunk
        return bytes(out)

    # -- writing ----------------------------------------------------------------------------

    def write(self, data: bytes, end_stream: bool = False) -> None:
        if self._stopped:
            raise StreamReset("the peer stopped reading this stream")
        if self._write_closed:
            return
        self._connection._send_stream_data(self.stream_id, data, end_stream)
        self._write_closed = end_stream

    def write_eof(self) -> None:
        self.write(b"", end_stream=True)

    def unsent_bytes(self) -> int:
        """Bytes written but not yet acknowledged: aioquic buffers without bound, so bulk
        writers wait while this is large (our own backpressure)."""
        return self._connection._unsent_bytes(self.stream_id)

    async def wait_writable(self, limit_bytes: int, poll_s: float = 0.002) -> None:
        """Wait until at most `limit_bytes` are in flight; raises `StreamReset` if it dies."""
        while self.unsent_bytes() > limit_bytes:
            if self._error is not None or self._connection.is_closed:
                raise StreamReset("stream closed while writing")
            await asyncio.sleep(poll_s)

    def is_usable(self) -> bool:
        """Neither direction ended nor failed, the connection alive: more may be exchanged."""
        return (
            self._error is None
            and not self._eof
            and not self._write_closed
            and not self._connection.is_closed
        )

    def reset(self, code: int) -> None:
        """Abort both directions with an application error code."""
        self._write_closed = True
        self._connection._reset_stream(self.stream_id, code)
