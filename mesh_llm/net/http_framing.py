"""The one HTTP framing between nodes, the same on every lane (a `ByteStream`).

Per request on a stream:
  requester → host: framed `HttpRequestHead` (u32 length + msgpack), then `body_len` bytes
  host → requester: framed `HttpResponseHead`, then body chunks, each a u32 length + bytes,
                    then a zero length (the end of this response; the stream is reusable)
The requester sends nothing while a response is under way, so anything it sends then — data,
the end of the stream or a reset — means it went away. Aborting is breaking the stream off:
the requester does it when its API client went away (the host cancels the llama-server
request), the host when its backend failed mid-body (the requester sees the stream end before
the zero length). Malformed input raises `FramingError`; a broken stream `StreamReset`.
"""

from __future__ import annotations

from mesh_llm.errors import DecodeError, FramingError
from mesh_llm.net.streams import ByteStream
from mesh_llm.wire.codec import decode_message, encode_frame
from mesh_llm.wire.messages import HttpRequestHead, HttpResponseHead

HEAD_MAX_BYTES = 64 * 1024  # request/response heads: method, path, headers
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # one body chunk on the wire (llama-server's are tiny)
LENGTH_BYTES = 4
END = (0).to_bytes(LENGTH_BYTES, "big")


async def _read_head(stream: ByteStream, length_bytes: bytes) -> HttpRequestHead | HttpResponseHead:
    length = int.from_bytes(length_bytes, "big")
    if length > HEAD_MAX_BYTES:
        raise FramingError(f"head of {length} bytes is over the {HEAD_MAX_BYTES} limit")
    try:
        message = decode_message(await stream.read_exactly(length))
    except DecodeError as exc:
        raise FramingError(f"bad head: {exc}") from exc
    if not isinstance(message, HttpRequestHead | HttpResponseHead):
        raise FramingError(f"expected an HTTP head, got {type(message).__name__}")
    return message


async def read_request(
    stream: ByteStream, max_body_bytes: int, first: bytes | None = None
) -> tuple[HttpRequestHead, bytes] | None:
    """The next request on `stream`, or None when the requester ended it between requests.
    `first`: its first byte when the caller already read it (b"": the stream had ended)."""
    if first is None:
        first = await stream.read(1)
    if not first:
        return None
    head = await _read_head(stream, first + await stream.read_exactly(LENGTH_BYTES - 1))
    if not isinstance(head, HttpRequestHead):
        raise FramingError(f"expected a request head, got {type(head).__name__}")
    if not 0 <= head.body_len <= max_body_bytes:
        raise FramingError(f"body of {head.body_len} bytes is over the limit")
    body = await stream.read_exactly(head.body_len) if head.body_len else b""
    return head, body


async def write_request(stream: ByteStream, head: HttpRequestHead, body: bytes) -> None:
    stream.write(encode_frame(head))
    await write_raw(stream, body)


async def read_response_head(stream: ByteStream) -> HttpResponseHead:
    head = await _read_head(stream, await stream.read_exactly(LENGTH_BYTES))
    if not isinstance(head, HttpResponseHead):
        raise FramingError("the host answered with a request head")
    return head


async def read_chunk(stream: ByteStream) -> bytes | None:
    """The next body chunk, or None at the end marker."""
    length = int.from_bytes(await stream.read_exactly(LENGTH_BYTES), "big")
    if length == 0:
        return None
    if length > MAX_CHUNK_BYTES:
        raise FramingError(f"a body chunk of {length} bytes is over the limit")
    return await stream.read_exactly(length)


def write_response_head(stream: ByteStream, status: int, headers: dict[str, str]) -> None:
    stream.write(encode_frame(HttpResponseHead(status, headers)))


async def write_chunk(stream: ByteStream, chunk: bytes) -> None:
    """One body chunk (empty chunks are skipped: a zero length is the end marker)."""
    view = memoryview(chunk)
    for start in range(0, len(view), MAX_CHUNK_BYTES):
        piece = view[start : start + MAX_CHUNK_BYTES]
        stream.write(len(piece).to_bytes(LENGTH_BYTES, "big") + bytes(piece))
        await stream.drain()


WRITE_PIECE_BYTES = 64 * 1024


async def write_raw(stream: ByteStream, data: bytes) -> None:
    """`data` in bounded pieces, waiting for the lane's buffer between them."""
    view = memoryview(data)
    for start in range(0, len(view), WRITE_PIECE_BYTES):
        stream.write(bytes(view[start : start + WRITE_PIECE_BYTES]))
        await stream.drain()
    if not data:
        await stream.drain()
