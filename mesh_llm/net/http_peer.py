"""API requests between nodes, over any lane: the requester's pool and the host's loop.

`HttpPeerClient.request(peer, head, body)` sends one request in the framing of
`net/http_framing.py` over a pooled stream to `peer` (a fresh one from `PeerTransport` when
none is idle) and returns once the response head arrived. The stream goes back to the pool when
the response reached its end marker; `abort()` breaks it off (the host cancels the
llama-server request); `finish()` — the client has the whole answer but left before the end
marker, as SSE clients do at `[DONE]` — reads to the marker in the background (at most
`finish_s`) so the host sees a complete request and the stream is kept. Those background
reads belong to the client's TaskGroup (`run()`).

`serve_http(stream, peer, answer, ...)` is the host's loop over one stream: read a request,
`answer` it through a `ResponseWriter` (cancelled if the requester goes away meanwhile; the
end marker leaves with the last chunk), wait for the next request until `idle_s` passes.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import FramingError, StreamReset
from mesh_llm.net.http_framing import (
    END,
    read_chunk,
    read_request,
    read_response_head,
    write_chunk,
    write_request,
    write_response_head,
)
from mesh_llm.net.streams import ByteStream, Lane
from mesh_llm.net.transport import PeerTransport
from mesh_llm.tasks import OwnedTasks
from mesh_llm.wire.messages import HttpRequestHead, StreamType

log = logging.getLogger(__name__)

Spawn = Callable[[Coroutine[Any, Any, None]], None]


@dataclass(slots=True)
class _Pooled:
    stream: ByteStream
    last_used: float = field(default_factory=time.monotonic)


class PeerResponse:
    """A response from another node: head received, body streaming."""

    def __init__(
        self,
        status: int,
        headers: dict[str, str],
        stream: ByteStream,
        release: Callable[[ByteStream], None],
        spawn: Spawn,
        finish_s: float,
    ) -> None:
        self.status = status
        self.headers = headers
        self.lane: Lane = stream.lane
        self._stream = stream
        self._release = release
        self._spawn = spawn
        self._finish_s = finish_s
        self._done = False

    async def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `TimeoutError` if none comes for `idle_timeout_s`,
        `StreamReset`/`FramingError` if the host broke off."""
        while True:
            async with asyncio.timeout(idle_timeout_s):
                chunk = await read_chunk(self._stream)
            if chunk is None:
                self._done = True
                self._release(self._stream)
                return
            yield chunk

    def abort(self) -> None:
        """Break the stream off unless the response ended (the host cancels the request)."""
        if not self._done:
            self._done = True
            self._stream.abort()

    def finish(self) -> None:
        """The client has the whole answer: read to the end marker in the background."""
        if not self._done:
            self._spawn(self._read_to_end())

    async def _read_to_end(self) -> None:
        try:
            async for _chunk in self.chunks(self._finish_s):
                pass
        except (StreamReset, FramingError, TimeoutError):
            pass
        self.abort()  # breaks the stream off unless the end marker came


class HttpPeerClient:
    """The requester's pool of streams to other hosts, for API requests (any lane)."""

    def __init__(
        self,
        transport: PeerTransport,
        *,
        pool_idle_s: float,
        pool_max_idle: int,
        finish_s: float,
    ) -> None:
        self._transport = transport
        self._pool_idle_s = pool_idle_s
        self._pool_max_idle = pool_max_idle
        self._finish_s = finish_s
        self._idle: dict[NodeId, list[_Pooled]] = {}
        self._tasks = OwnedTasks()
        self.sent: dict[Lane, int] = {"fast": 0, "quic": 0, "relay": 0}

    async def run(self) -> None:
        """Own the background reads of `finish()` until cancelled; then close idle streams."""
        try:
            await self._tasks.hold()
        finally:
            idle = [p.stream for pooled in self._idle.values() for p in pooled]
            self._idle.clear()
            for stream in idle:
                stream.close()
            await asyncio.gather(*(stream.wait_closed() for stream in idle))

    async def request(
        self, peer: NodeId, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> PeerResponse:
        """Send one request and wait for its response head, at most `first_byte_timeout_s`
        from the moment a stream is there (reaching the peer has its own timeouts: dial,
        hello, fast-lane connect). Raises `PeerUnavailable` (incl. `StreamReset`),
        `FramingError` or `TimeoutError`."""
        pooled = self._take_idle(peer)
        if pooled is not None:
            try:
                return await self._exchange(peer, pooled, head, body, first_byte_timeout_s)
            except StreamReset as exc:
                # The host may have closed the idle stream as we reused it: one fresh stream
                # is safe, the host answered nothing on this one.
                log.debug("pooled stream to %s failed (%s); opening another", short_id(peer), exc)
        stream = await self._transport.open(peer, StreamType.HTTP)
        return await self._exchange(peer, stream, head, body, first_byte_timeout_s)

    def forget(self, peer: NodeId) -> None:
        """Close the idle streams to `peer` (a request to it failed: start afresh)."""
        for pooled in self._idle.pop(peer, []):
            pooled.stream.close()

    def snapshot(self) -> dict[str, object]:
        """For /api/status: requests sent over each lane, and hosts on QUIC for now (why)."""
        down = self._transport.on_quic_for_now()
        relayed = self._transport.relayed_now()
        return {
            "fast": self.sent["fast"],
            "quic": self.sent["quic"],
            "relay": self.sent["relay"],
            "quic_for_now": [short_id(peer) for peer in down],
            "relayed_for_now": {short_id(p): short_id(via) for p, via in relayed.items()},
            "reasons": {
                short_id(peer): self._transport.reason_of(peer) for peer in [*down, *relayed]
            },
        }

    def _take_idle(self, peer: NodeId) -> ByteStream | None:
        """An idle stream to `peer`, unless it is stale, broken, or a QUIC stream while the
        fast lane is eligible again (its failure memory expired): those are closed, so that
        a fresh stream from the transport tries the fast lane."""
        idle = self._idle.get(peer, [])
        now = time.monotonic()
        fast_again = any(p.stream.lane == "quic" for p in idle) and (
            self._transport.fast_lane_eligible(peer, StreamType.HTTP)
        )
        while idle:
            pooled = idle.pop()
            fresh = pooled.stream.is_usable() and now - pooled.last_used < self._pool_idle_s
            if fresh and not (fast_again and pooled.stream.lane == "quic"):
                return pooled.stream
            pooled.stream.close()
        return None

    def _release(self, peer: NodeId) -> Callable[[ByteStream], None]:
        def release(stream: ByteStream) -> None:
            idle = self._idle.setdefault(peer, [])
            if len(idle) >= self._pool_max_idle or not stream.is_usable():
                stream.close()
                return
            idle.append(_Pooled(stream))

        return release

    async def _exchange(
        self,
        peer: NodeId,
        stream: ByteStream,
        head: HttpRequestHead,
        body: bytes,
        first_byte_timeout_s: float,
    ) -> PeerResponse:
        try:
            async with asyncio.timeout(first_byte_timeout_s):
                await write_request(stream, head, body)
                answer = await read_response_head(stream)
        except BaseException:
            stream.abort()
            raise
        self.sent[stream.lane] += 1
        return PeerResponse(
            answer.status,
            dict(answer.headers),
            stream,
            self._release(peer),
            self._spawn,
            self._finish_s,
        )

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        group = self._tasks.group
        if group is None:  # not running (a test without run(), or shutting down)
            work.close()
            return
        group.create_task(work)


class ResponseWriter:
    """The host's answer to one request on a stream: head, body chunks, then the end."""

    def __init__(self, stream: ByteStream) -> None:
        self._stream = stream
        self.ended = False

    def head(self, status: int, headers: dict[str, str]) -> None:
        write_response_head(self._stream, status, headers)

    async def body(self, chunk: bytes) -> None:
        if chunk:
            await write_chunk(self._stream, chunk)

    def end(self) -> None:
        """The end marker, at once: it leaves with the last chunk."""
        self.ended = True
        self._stream.write(END)

    def abort(self) -> None:
        self._stream.abort()


Answer = Callable[[ResponseWriter, HttpRequestHead, bytes], Awaitable[None]]


async def serve_http(
    stream: ByteStream, peer: NodeId, answer: Answer, *, max_body_bytes: int, idle_s: float
) -> None:
    """Answer requests on one stream, one at a time, until it ends or stays idle `idle_s`."""
    first: bytes | None = None  # a byte of the next request, read while watching the last
    while True:
        try:
            async with asyncio.timeout(idle_s):
                request = await read_request(stream, max_body_bytes, first)
        except TimeoutError:
            stream.close()
            return
        except StreamReset:
            stream.abort()  # the requester went away (or cut its request short)
            return
        except FramingError as exc:
            log.warning("bad API request stream from %s: %s", short_id(peer), exc)
            stream.abort()
            return
        if request is None:
            stream.close()  # the requester ended a pooled stream
            return
        head, body = request
        writer = ResponseWriter(stream)
        answered, first = await _answer_while_watching(stream, answer(writer, head, body))
        if not answered:
            request_id = head.headers.get("X-Request-Id", "")
            log.info("request %s from %s: requester went away", request_id, short_id(peer))
            stream.abort()
            return
        if not writer.ended:
            return  # aborted mid-body: the stream is broken off


async def _answer_while_watching(
    stream: ByteStream, answering: Awaitable[None]
) -> tuple[bool, bytes | None]:
    """Run `answering` while watching the stream: the requester sends nothing while its
    answer is under way, so data, the end of the stream or a reset before the answer is done
    mean it went away (then the answer is cancelled: `(False, None)`). After the answer, what
    the watch read is the first byte of the next request (or b"": the stream ended) —
    `(True, that)`. The answer's own error is raised."""
    async with asyncio.TaskGroup() as group:
        work = group.create_task(_outcome(answering))
        watch = group.create_task(_outcome(stream.read(1)))
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            return False, None
        watch.cancel()
    outcome = work.result()
    if isinstance(outcome, BaseException):
        raise outcome
    if watch.cancelled():
        return True, None
    read = watch.result()
    return True, read if isinstance(read, bytes) else b""


async def _outcome(awaitable: Awaitable[object]) -> object:
    """`awaitable`'s result, or its exception (not a cancellation) as a value, so that the
    TaskGroup above never ends in an ExceptionGroup."""
    try:
        return await awaitable
    except Exception as exc:
        return exc
