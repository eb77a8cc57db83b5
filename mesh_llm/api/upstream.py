"""Where a proxied request's answer comes from: the local llama-server, or another host.

Another host is reached through the mesh (`open_remote`; which lane carries it is the
transport's business, see `net/transport.py`). Both kinds look the same to the proxy: the
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
from mesh_llm.errors import MeshError, UpstreamFailed

__all__ = ["UpstreamFailed"]  # raised by every `open_*` here (defined in errors.py)
from mesh_llm.wire.messages import HttpRequestHead

FORWARDED_HEADERS = ("Content-Type", "Retry-After")
LOCAL_CONNECT_ATTEMPTS = 2  # a stale pooled connection, then a fresh one
# What a request to another host can fail with: a mesh error (no lane, the stream broken off,
# bad framing) or one of our timeouts (first byte, idle between chunks).
PEER_FAILURES = (MeshError, TimeoutError)
LOCAL_FAILURES = (aiohttp.ClientError, TimeoutError)  # the local llama-server's, via aiohttp


class Upstream(Protocol):
    status: int
    headers: dict[str, str]

    def chunks(self) -> AsyncIterator[bytes]: ...

    def close(self) -> None: ...

    def finish(self) -> None:
        """The client has the whole answer (an SSE stream's `[DONE]`) but left before its
        end: let the backend end it (a pooled stream to another host survives), not abort."""
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
        except LOCAL_FAILURES as exc:
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
        except LOCAL_FAILURES as exc:
            raise UpstreamFailed(f"the local backend failed before answering: {exc!r}") from exc
        return LocalUpstream(response)
    raise AssertionError("unreachable")  # pragma: no cover


class RemoteResponse(Protocol):
    """A response from another host, head received (`net/http_peer.PeerResponse`)."""

    status: int
    headers: dict[str, str]

    def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]: ...

    def abort(self) -> None: ...

    def finish(self) -> None: ...


class PeerRequests(Protocol):
    """How to send a request to another host (the node's `HttpPeerClient`)."""

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> RemoteResponse:
        """Reach `node_id`, send, and wait for the response head at most
        `first_byte_timeout_s`; raises `MeshError` or `TimeoutError` when it failed."""
        ...


class RemoteUpstream:
    """A response streaming back from another node."""

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
        except PEER_FAILURES as exc:
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


async def open_remote(
    peers: PeerRequests, node_id: str, head: HttpRequestHead, body: bytes, config: ApiConfig
) -> RemoteUpstream:
    """Send the request to `node_id` and wait for the response head (first-byte timeout)."""
    try:
        response = await peers.send_request(node_id, head, body, config.first_byte_timeout_s)
    except UpstreamFailed:
        raise
    except PEER_FAILURES as exc:
        raise UpstreamFailed(f"the remote host failed before answering: {exc!r}") from exc
    return RemoteUpstream(response, config.idle_chunk_timeout_s)
