"""API requests over the fast lane (TCP + TLS 1.3), QUIC streams as the fallback.

aioquic costs about 1.7 ms per small round trip on a modest CPU; an API request to another
node pays it on its way to the first token. So a requester carries requests to a host over a
pooled, authenticated fast-lane connection (purpose `HTTP`) when it can, one request at a time
per connection, and the connection goes back to the pool when the response has ended.

Wire, per request on a connection:
  requester → host: framed `HttpRequestHead` (u32 length + msgpack), then `body_len` bytes
  host → requester: framed `HttpResponseHead`, then body chunks, each a u32 length + bytes,
                    then a zero length (the end of this response; the connection is reusable)
Aborting is closing: the requester closes the connection when its API client went away (the
host sees EOF while answering and cancels the llama-server request); the host closes it when
its backend failed mid-body (the requester sees EOF before the zero length).

`HttpLanes` is the requester's pool (`send` returns None when the host has no usable lane; the
caller then uses QUIC, and the lane is retried after `LANE_RETRY_S`). `serve_http_lane` is the
host's loop over one connection, answering through a `ResponseSink`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import PeerUnavailable, ProtocolError
from mesh_llm.identity import NodeIdentity
from mesh_llm.net.fastlane import close_and_wait, fast_lane_connect
from mesh_llm.net.http_tunnel import (
    TunnelProtocolError,
    answer_unless_gone,
    read_head,
    read_request_from,
)
from mesh_llm.wire.codec import encode_frame
from mesh_llm.wire.messages import HttpRequestHead, HttpResponseHead, StreamType

log = logging.getLogger(__name__)

LANE_RETRY_S = 60.0  # after a failed dial, QUIC carries a host's requests for this long
POOL_IDLE_S = 20.0  # the requester drops a pooled connection unused this long
POOL_MAX_IDLE = 16  # idle connections kept per host (each TLS connection holds ~300 KB)
HOST_IDLE_S = 60.0  # the host closes a connection that brings no request this long
FINISH_S = 2.0  # reading an answer to its end marker after its client left with all of it
MAX_CHUNK_BYTES = 16 * 1024 * 1024  # one body chunk on the wire (llama-server's are tiny)
_LENGTH_BYTES = 4
_END = (0).to_bytes(_LENGTH_BYTES, "big")

AddressOf = Callable[[NodeId], tuple[str, int] | None]


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    last_used: float = field(default_factory=time.monotonic)

    def usable(self, now: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.last_used < POOL_IDLE_S
        )


class LaneResponse:
    """A response arriving over a fast-lane connection: head received, body streaming."""

    def __init__(
        self,
        head: HttpResponseHead,
        connection: _Connection,
        release: Callable[[_Connection], None],
        adopt: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.status = head.status
        self.headers = dict(head.headers)
        self._connection = connection
        self._release = release
        self._adopt = adopt
        self._done = False

    async def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        """Body chunks as they arrive; `TimeoutError` if none comes for `idle_timeout_s`,
        `ConnectionError`/`asyncio.IncompleteReadError` if the host broke off."""
        reader = self._connection.reader
        while True:
            async with asyncio.timeout(idle_timeout_s):
                length = int.from_bytes(await reader.readexactly(_LENGTH_BYTES), "big")
                if length == 0:
                    self._done = True
                    self._release(self._connection)
                    return
                if length > MAX_CHUNK_BYTES:
                    raise TunnelProtocolError(f"a body chunk of {length} bytes is over the limit")
                chunk = await reader.readexactly(length)
            yield chunk

    def abort(self) -> None:
        """Close the connection unless the response ended (the host cancels the request)."""
        if not self._done:
            self._connection.writer.close()

    def finish(self) -> None:
        """The client has the whole answer but left before the end marker (an SSE client
        stops at `[DONE]`): read to the marker in the background (at most `FINISH_S`) so the
        host sees a complete request and the connection goes back to the pool."""
        if not self._done:
            self._adopt(self._read_to_end())

    async def _read_to_end(self) -> None:
        try:
            async for _chunk in self.chunks(FINISH_S):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        self.abort()  # closes the connection unless the end marker came


class HttpLanes:
    """The requester's pool of fast-lane connections for API requests, per host."""

    def __init__(
        self, identity: NodeIdentity, address_of: AddressOf, connect_timeout_s: float
    ) -> None:
        self._identity = identity
        self._address_of = address_of
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[NodeId, list[_Connection]] = {}
        self._down_until: dict[NodeId, float] = {}
        self._finishing: set[asyncio.Task[None]] = set()  # responses read to their end
        self.sent = {"fast": 0, "quic": 0}

    async def send(
        self, node_id: NodeId, head: HttpRequestHead, body: bytes
    ) -> LaneResponse | None:
        """Send one request to `node_id` and wait for its response head; None when there is
        no fast lane to it (the caller uses QUIC). Raises `ConnectionError` (incl.
        `TunnelProtocolError`) or `asyncio.IncompleteReadError` when the host failed."""
        pooled = self._take_idle(node_id)
        if pooled is not None:
            try:
                return await self._exchange(node_id, pooled, head, body)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                # The host may have closed the idle connection as we reused it: one fresh
                # connection is safe, the host answered nothing on this one.
                log.debug("pooled lane to %s failed (%r); dialling again", short_id(node_id), exc)
        connection = await self._dial(node_id)
        if connection is None:
            self.sent["quic"] += 1
            return None
        return await self._exchange(node_id, connection, head, body)

    def snapshot(self) -> dict[str, object]:
        """For /api/status: requests sent over each lane, and hosts on QUIC for now."""
        now = time.monotonic()
        down = [short_id(n) for n, until in self._down_until.items() if until > now]
        return {"fast": self.sent["fast"], "quic": self.sent["quic"], "quic_for_now": down}

    async def close_all(self) -> None:
        for task in list(self._finishing):
            task.cancel()
        await asyncio.gather(*self._finishing, return_exceptions=True)
        connections = [c for idle in self._idle.values() for c in idle]
        self._idle.clear()
        await asyncio.gather(*(close_and_wait(c.writer) for c in connections))

    def _take_idle(self, node_id: NodeId) -> _Connection | None:
        idle = self._idle.get(node_id, [])
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if connection.usable(now):
                return connection
            connection.writer.close()
        return None

    def _release(self, node_id: NodeId) -> Callable[[_Connection], None]:
        def release(connection: _Connection) -> None:
            idle = self._idle.setdefault(node_id, [])
            if len(idle) >= POOL_MAX_IDLE:
                connection.writer.close()
                return
            connection.last_used = time.monotonic()
            idle.append(connection)

        return release

    async def _dial(self, node_id: NodeId) -> _Connection | None:
        if time.monotonic() < self._down_until.get(node_id, 0.0):
            return None
        address = self._address_of(node_id)
        if address is None:
            return None
        try:
            reader, writer, _peer = await fast_lane_connect(
                self._identity,
                address[0],
                address[1],
                node_id,
                self._connect_timeout_s,
                StreamType.HTTP,
            )
        except (PeerUnavailable, ProtocolError) as exc:
            log.info(
                "no fast lane for API requests to %s (%s); QUIC carries them for %.0f s",
                short_id(node_id),
                exc,
                LANE_RETRY_S,
            )
            self._down_until[node_id] = time.monotonic() + LANE_RETRY_S
            return None
        return _Connection(reader, writer)

    async def _exchange(
        self, node_id: NodeId, connection: _Connection, head: HttpRequestHead, body: bytes
    ) -> LaneResponse:
        try:
            connection.writer.write(encode_frame(head) + body)
            await connection.writer.drain()
            answer = await read_head(connection.reader.readexactly)
            if not isinstance(answer, HttpResponseHead):
                raise TunnelProtocolError("the host answered with a request head")
        except BaseException:
            connection.writer.close()
            raise
        self.sent["fast"] += 1
        return LaneResponse(answer, connection, self._release(node_id), self._adopt)

    def _adopt(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._finishing.add(task)
        task.add_done_callback(self._finishing.discard)


# -- host side ---------------------------------------------------------------------------------


class LaneSink:
    """The `ResponseSink` of one request on a fast-lane connection."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self.ended = False

    def head(self, status: int, headers: dict[str, str]) -> None:
        self._writer.write(encode_frame(HttpResponseHead(status, headers)))

    async def body(self, chunk: bytes) -> None:
        if chunk:
            self._writer.write(len(chunk).to_bytes(_LENGTH_BYTES, "big") + chunk)
            await self._writer.drain()

    def end(self) -> None:
        self.ended = True  # the end marker is written once the request is over (see below)

    def abort(self) -> None:
        self._writer.close()


Answer = Callable[[LaneSink, HttpRequestHead, bytes], Awaitable[None]]


async def serve_http_lane(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    peer: NodeId,
    answer: Answer,
    max_body_bytes: int,
) -> None:
    """Answer requests on one authenticated connection, one at a time, until it closes."""
    while True:
        try:
            async with asyncio.timeout(HOST_IDLE_S):
                head, body = await read_request_from(reader.readexactly, max_body_bytes)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                log.warning("API lane from %s closed mid-request", short_id(peer))
            return  # the requester closed its pooled connection
        except TimeoutError:
            return
        except TunnelProtocolError as exc:
            log.warning("bad API request on the fast lane from %s: %s", short_id(peer), exc)
            return
        sink = LaneSink(writer)
        # The requester sends nothing while a response is under way: data or EOF both mean
        # it closed the connection (its client went away).
        if not await answer_unless_gone(answer(sink, head, body), reader.read(1)):
            request_id = head.headers.get("X-Request-Id", "")
            log.info("request %s from %s: requester went away", request_id, short_id(peer))
            return
        if not sink.ended:
            return  # aborted mid-body: the connection is closed
        writer.write(_END)
        await writer.drain()
