"""API requests over `HTTP` QUIC streams: one request/response per stream.

Wire: the requester writes a framed `HttpRequestHead` (u32 length + msgpack), then exactly
`body_len` raw body bytes, then ends its side. The host answers a framed `HttpResponseHead`,
then the raw response body as it is produced (SSE chunks pass through unchanged), then ends
the stream. Either side resets the stream to abort: the requester when its API client went
away (the host then cancels the llama-server request), the host when its backend failed
mid-body. Bodies are written in bounded pieces, waiting while too many bytes are unacknowledged
(aioquic has no backpressure of its own); reads are bounded per chunk.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from mesh_llm.net.quic import QuicPeerConnection, QuicStream
from mesh_llm.wire.codec import DecodeError, decode_message, encode_frame
from mesh_llm.wire.messages import HttpRequestHead, HttpResponseHead, RefuseCode, StreamType

HEAD_MAX_BYTES = 64 * 1024  # request/response heads: method, path, headers
WRITE_CHUNK_BYTES = 64 * 1024
MAX_UNSENT_BYTES = 1024 * 1024  # per stream, before a writer waits for acknowledgements
READ_CHUNK_BYTES = 64 * 1024
_LENGTH_BYTES = 4


class TunnelProtocolError(ConnectionError):
    """The other side sent something that is not a valid HTTP stream."""


ReadExactly = Callable[[int], Awaitable[bytes]]


async def read_head(read_exactly: ReadExactly) -> HttpRequestHead | HttpResponseHead:
    """One framed head (u32 length + msgpack) from a QUIC stream or a fast-lane connection."""
    length = int.from_bytes(await read_exactly(_LENGTH_BYTES), "big")
    if length > HEAD_MAX_BYTES:
        raise TunnelProtocolError(f"head of {length} bytes is over the {HEAD_MAX_BYTES} limit")
    try:
        message = decode_message(await read_exactly(length))
    except DecodeError as exc:
        raise TunnelProtocolError(f"bad head: {exc}") from exc
    if not isinstance(message, HttpRequestHead | HttpResponseHead):
        raise TunnelProtocolError(f"expected an HTTP head, got {type(message).__name__}")
    return message


async def read_request_from(
    read_exactly: ReadExactly, max_body_bytes: int
) -> tuple[HttpRequestHead, bytes]:
    """The head and body of one inbound request. Raises `TunnelProtocolError` (and the
    transport's own errors)."""
    head = await read_head(read_exactly)
    if not isinstance(head, HttpRequestHead):
        raise TunnelProtocolError("expected a request head")
    if not 0 <= head.body_len <= max_body_bytes:
        raise TunnelProtocolError(f"body of {head.body_len} bytes is over the limit")
    body = await read_exactly(head.body_len) if head.body_len else b""
    return head, body


async def write_body(stream: QuicStream, data: bytes) -> None:
    """Write `data` in bounded pieces, waiting for acknowledgements between them."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_CHUNK_BYTES):
        await stream.wait_writable(MAX_UNSENT_BYTES)
        stream.write(bytes(view[start : start + WRITE_CHUNK_BYTES]))


# -- requester side ----------------------------------------------------------------------------


@dataclass(slots=True)
class TunnelResponse:
    """A response arriving over an HTTP stream: head received, body still streaming."""

    status: int
    headers: dict[str, str]
    stream: QuicStream

    async def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `TimeoutError` if none comes for `idle_timeout_s`."""
        while True:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await self.stream.read(READ_CHUNK_BYTES)
            if not chunk:
                return
            yield chunk

    def abort(self) -> None:
        """Reset the stream (the API client went away): the host cancels the request."""
        self.stream.reset(RefuseCode.SHUTTING_DOWN)

    def finish(self) -> None:
        """The client has the whole answer: a stream is not reused, so resetting is fine."""
        self.abort()


async def send_request(
    connection: QuicPeerConnection, head: HttpRequestHead, body: bytes
) -> TunnelResponse:
    """Send one request and wait for the response head. Raises `StreamReset` or
    `TunnelProtocolError`; the caller bounds the wait with its first-byte timeout."""
    stream = await connection.open_stream(StreamType.HTTP)
    try:
        stream.write(encode_frame(head))
        await write_body(stream, body)
        stream.write_eof()
        answer = await read_head(stream.read_exactly)
    except BaseException:
        stream.reset(RefuseCode.SHUTTING_DOWN)
        raise
    if not isinstance(answer, HttpResponseHead):
        stream.reset(RefuseCode.PROTOCOL_ERROR)
        raise TunnelProtocolError("the host answered with a request head")
    return TunnelResponse(answer.status, dict(answer.headers), stream)


# -- host side ---------------------------------------------------------------------------------


async def read_request(stream: QuicStream, max_body_bytes: int) -> tuple[HttpRequestHead, bytes]:
    """The head and body of one inbound request. Raises `TunnelProtocolError`/`StreamReset`."""
    return await read_request_from(stream.read_exactly, max_body_bytes)


def send_response_head(stream: QuicStream, status: int, headers: dict[str, str]) -> None:
    stream.write(encode_frame(HttpResponseHead(status, headers)))


async def answer_unless_gone(answering: Awaitable[None], gone: Awaitable[object]) -> bool:
    """Host side, either transport: run `answering`, and cancel it if `gone` completes first
    (the requester reset its stream or closed its connection: its client went away). True
    when the answer ran to its end with the requester still there; the answer's own error
    is raised."""
    work = asyncio.ensure_future(answering)
    left = asyncio.ensure_future(gone)
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (work, left):
            task.cancel()
        await asyncio.gather(work, left, return_exceptions=True)
    if left.done() and not left.cancelled():
        return False
    work.result()
    return True
