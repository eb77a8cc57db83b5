"""Where a proxied request's answer comes from: the local llama-server, or another host.

Another host is reached over the fast lane when it has one (`open_lane`, see `net/http_lane`),
else over an `HTTP` QUIC stream (`open_remote`). All kinds look the same to the proxy: the
`open_*` functions send the request and return
once the response head has arrived (bounded by the first-byte timeout), or raise
`UpstreamFailed` — the point before which a request can still be retried on another replica.
`Upstream.chunks()` then yields body chunks as they come (idle timeout between chunks, never a
total timeout) and raises `UpstreamFailed` if the backend breaks mid-body; `close()` drops the
connection or resets the stream so the backend stops generating when the client went away.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Protocol

import aiohttp

from mesh_llm.config import ApiConfig
from mesh_llm.errors import MeshError
from mesh_llm.net.http_tunnel import TunnelProtocolError, send_request
from mesh_llm.net.quic import QuicPeerConnection, StreamReset
from mesh_llm.wire.messages import HttpRequestHead

FORWARDED_HEADERS = ("Content-Type", "Retry-After")
LOCAL_CONNECT_ATTEMPTS = 2  # a stale pooled connection, then a fresh one
# llama-server (cpp-httplib) closes idle keep-alive connections after 5 s; the client pool
# drops them sooner so that reuse rarely races with that close.
UPSTREAM_KEEPALIVE_S = 2.0


class LaneSender(Protocol):
    async def send_over_lane(
        self, node_id: str, head: HttpRequestHead, body: bytes
    ) -> RemoteResponse | None:
        """Send over the fast lane and wait for the head; None when there is no lane."""
        ...


class UpstreamFailed(MeshError):
    """The backend failed (before the response head, or mid-body)."""


class Upstream(Protocol):
    status: int
    headers: dict[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...

    def finish(self) -> None:
        """The client has the whole answer (an SSE stream's `[DONE]`) but left before its
        end: let the backend end it (a pooled lane connection survives) instead of aborting."""
        ...


class LocalUpstream:
    """A response from this node's llama-server (aiohttp)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = {k: response.headers[k] for k in FORWARDED_HEADERS if k in response.headers}

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(f"the backend failed mid-response: {exc!r}") from exc

    def close(self) -> None:
        # close(), not release(): a half-read response must drop the connection so that
        # llama-server sees the disconnect and frees the slot.
        self._response.close()

    def finish(self) -> None:
        self.close()  # llama-server has sent everything; nothing is lost by closing


async def open_local(
    session: aiohttp.ClientSession,
    endpoint: str,
    path: str,
    body: bytes,
    request_id: str,
    config: ApiConfig,
) -> LocalUpstream:
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.upstream_connect_timeout_s,
        sock_read=config.idle_chunk_timeout_s,
    )
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    for attempt in range(LOCAL_CONNECT_ATTEMPTS):
        try:
            async with asyncio.timeout(config.first_byte_timeout_s):
                response = await session.post(
                    endpoint + path, data=body, headers=headers, timeout=timeout
                )
        except aiohttp.ClientConnectionError as exc:
            # A pooled keep-alive connection that llama-server closed meanwhile fails like
            # this before anything was generated: one fresh connection is always safe.
            if attempt + 1 < LOCAL_CONNECT_ATTEMPTS:
                continue
            raise UpstreamFailed(f"the local backend failed before answering: {exc!r}") from exc
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise UpstreamFailed(f"the local backend failed before answering: {exc!r}") from exc
        return LocalUpstream(response)
    raise AssertionError("unreachable")  # pragma: no cover


class RemoteResponse(Protocol):
    """A response from another host, head received: over QUIC or over the fast lane."""

    status: int
    headers: dict[str, str]

    def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]: ...

    def abort(self) -> None: ...

    def finish(self) -> None: ...


class RemoteUpstream:
    """A response streaming back from another node (QUIC stream or fast-lane connection)."""

    def __init__(self, response: RemoteResponse, idle_timeout_s: float) -> None:
        self._response = response
        self._idle_timeout_s = idle_timeout_s
        self._done = False
        self.status = response.status
        self.headers = response.headers
        self.body_bytes = 0

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.chunks(self._idle_timeout_s):
                self.body_bytes += len(chunk)
                yield chunk
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
            raise UpstreamFailed(f"the remote host failed mid-response: {exc!r}") from exc
        self._done = True

    def finish(self) -> None:
        if not self._done:
            self._done = True
            self._response.finish()

    def close(self) -> None:
        if not self._done:
            self._response.abort()


def request_head(path: str, body: bytes, request_id: str) -> HttpRequestHead:
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    return HttpRequestHead("POST", path, headers, len(body))


async def open_lane(
    lanes: LaneSender, node_id: str, head: HttpRequestHead, body: bytes, config: ApiConfig
) -> RemoteUpstream | None:
    """Send the request over the fast lane to `node_id`; None when it has none (use QUIC)."""
    try:
        async with asyncio.timeout(config.first_byte_timeout_s):
            response = await lanes.send_over_lane(node_id, head, body)
    except (ConnectionError, asyncio.IncompleteReadError, TimeoutError) as exc:
        raise UpstreamFailed(f"the remote host failed before answering: {exc!r}") from exc
    return RemoteUpstream(response, config.idle_chunk_timeout_s) if response is not None else None


async def open_remote(
    connection: QuicPeerConnection, head: HttpRequestHead, body: bytes, config: ApiConfig
) -> RemoteUpstream:
    """Send the request over an `HTTP` QUIC stream and wait for the response head."""
    try:
        async with asyncio.timeout(config.first_byte_timeout_s):
            response = await send_request(connection, head, body)
    except (StreamReset, TunnelProtocolError, TimeoutError) as exc:
        raise UpstreamFailed(f"the remote host failed before answering: {exc!r}") from exc
    return RemoteUpstream(response, config.idle_chunk_timeout_s)
