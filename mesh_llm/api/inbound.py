"""The API host: requests other nodes send this node over `HTTP` streams (any lane).

Each request (`net/http_peer.serve_http` reads them off a stream) is for a model this node
serves; it is routed to the LOCAL backend
only (never forwarded again, so requests cannot loop), relayed back chunk by chunk with
backpressure, and cancelled when the requester breaks the stream off (its client went away):
the llama-server connection is closed and the slot frees at once. Refusals (bad body, model not
served here, not ready) come back as OpenAI-shaped JSON with their status, so the requester can
relay them or retry elsewhere. `/mesh/drop` is answered by the node's drop handler.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import aiohttp

from mesh_llm.api.admission import LocalAdmission
from mesh_llm.api.drain import SHUTTING_DOWN_CODE, SHUTTING_DOWN_MESSAGE, Drain
from mesh_llm.api.metrics import CLIENT_CLOSED_STATUS, ERROR_STATUS, ApiMetrics
from mesh_llm.api.openai import PROXIED_PATHS, error_body, validate_request
from mesh_llm.api.operations import QUEUE_FULL_STATUS, queue_full_message
from mesh_llm.api.proxy import ModelDirectory
from mesh_llm.api.upstream import Upstream, UpstreamFailed, open_local
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import RouteRefused, choose_route
from mesh_llm.core.types import NodeId
from mesh_llm.errors import InvalidRequest
from mesh_llm.net.http_peer import serve_http
from mesh_llm.net.streams import ByteStream
from mesh_llm.wire.messages import HttpRequestHead

log = logging.getLogger(__name__)

DROP_PATH = "/mesh/drop"
BROKEN_OFF_STATUS = 502  # counted for an answer broken off mid-body (its backend failed)

DropHandler = Callable[[str], Awaitable[tuple[int, dict[str, Any]]]]


class InboundRequests:
    """Answers HTTP streams from other nodes from this node's own backends."""

    def __init__(
        self,
        directory: ModelDirectory,
        session: aiohttp.ClientSession,
        config: ApiConfig,
        admission: LocalAdmission,
        metrics: ApiMetrics,
        drop: DropHandler | None = None,
        drain: Drain | None = None,
    ) -> None:
        self._directory = directory
        self._metrics = metrics
        self._admission = admission
        self._session = session
        self._config = config
        self.drop = drop
        # The node's: counts the answers in flight, refuses while draining.
        self.drain = drain if drain is not None else Drain()
        self.served = 0

    async def serve(self, stream: ByteStream, peer: NodeId) -> None:
        """Answer the requests another node sends on `stream`, one at a time."""
        try:
            await serve_http(
                stream,
                peer,
                self.answer,
                max_body_bytes=self._config.max_body_bytes,
                idle_s=self._config.peer_stream_idle_s,
            )
        finally:
            self.served += 1

    async def answer(self, stream: ResponseSink, head: HttpRequestHead, body: bytes) -> None:
        """Answer one request from another node through `stream`, from the local backend;
        counted in `/metrics` (`mesh_llm_peer_requests_total`) with the status it got."""
        recorded = _Recorded(stream)
        try:
            if self.drain.draining and head.path in PROXIED_PATHS:
                retry_after_s = self._config.retry_after_s  # the requester tries a replica
                message, code = SHUTTING_DOWN_MESSAGE, SHUTTING_DOWN_CODE
                await _send_error(recorded, 503, message, code, retry_after_s)
                return
            with self.drain.track():
                await self._answer(recorded, head, body)
        except asyncio.CancelledError:
            recorded.status = CLIENT_CLOSED_STATUS  # the requester went away
            raise
        finally:
            if head.path in PROXIED_PATHS:
                self._metrics.peer_request(recorded.model, recorded.status or ERROR_STATUS)

    async def _answer(self, stream: _Recorded, head: HttpRequestHead, body: bytes) -> None:
        path, request_id = head.path, head.headers.get("X-Request-Id", "")
        if path == DROP_PATH and self.drop is not None:
            status, document = await self.drop(_drop_model(body))
            await _send_json(stream, status, document)
            return
        if path not in PROXIED_PATHS:
            await _send_error(stream, 404, f"no such API path: {path}", "not_found")
            return
        try:
            requested = validate_request(path, json.loads(body))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            await _send_error(stream, 400, f"the request body is not valid JSON: {exc}", "bad_json")
            return
        except InvalidRequest as exc:
            await _send_error(stream, 400, str(exc), "invalid_request")
            return
        statuses = [dataclasses.replace(m, remote=()) for m in self._directory.model_statuses()]
        route = choose_route(requested, statuses, retry_after_s=self._config.retry_after_s)
        if isinstance(route, RouteRefused):
            await _send_error(stream, route.status, route.message, route.code, route.retry_after_s)
            return
        assert route.endpoint is not None  # remote candidates were removed above
        stream.model = route.model
        release = self._admission.try_acquire(route.model)
        if release is None:  # the requester retries on another replica or relays the 429
            message = queue_full_message(route.model, self._config)
            retry_after_s = self._config.busy_retry_after_s
            await _send_error(stream, QUEUE_FULL_STATUS, message, "queue_full", retry_after_s)
            return
        try:
            try:
                upstream = await open_local(
                    self._session, route.endpoint, path, body, request_id, self._config
                )
            except UpstreamFailed as exc:
                await _send_error(stream, 502, str(exc), "upstream_failed")
                return
            try:
                await _relay(stream, upstream)
            finally:
                upstream.close()
        finally:
            release()


class ResponseSink(Protocol):
    """Where the answer to another node's request goes (`net/http_peer.ResponseWriter`).
    `abort()` breaks the response off (the requester sees it fail)."""

    def head(self, status: int, headers: dict[str, str]) -> None: ...

    async def body(self, chunk: bytes) -> None: ...

    def end(self) -> None: ...

    def abort(self) -> None: ...


class _Recorded:
    """A `ResponseSink` that remembers the status it answered and the model it served."""

    def __init__(self, sink: ResponseSink) -> None:
        self._sink = sink
        self.status = 0
        self.model = ""

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status = status
        self._sink.head(status, headers)

    async def body(self, chunk: bytes) -> None:
        await self._sink.body(chunk)

    def end(self) -> None:
        self._sink.end()

    def abort(self) -> None:
        self.status = BROKEN_OFF_STATUS
        self._sink.abort()


async def _relay(stream: ResponseSink, upstream: Upstream) -> None:
    stream.head(upstream.status, dict(upstream.headers))
    try:
        async for chunk in upstream.chunks():
            await stream.body(chunk)
    except UpstreamFailed as exc:
        log.warning("backend failed mid-answer to a remote request: %s", exc)
        stream.abort()  # the requester ends its client's stream
        return
    stream.end()


def _drop_model(body: bytes) -> str:
    try:
        document = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return ""
    model = document.get("model") if isinstance(document, dict) else None
    return model if isinstance(model, str) else ""


async def _send_json(
    stream: ResponseSink,
    status: int,
    document: dict[str, Any],
    extra_headers: dict[str, str] | None = None,
) -> None:
    stream.head(status, {"Content-Type": "application/json", **(extra_headers or {})})
    await stream.body(json.dumps(document).encode())
    stream.end()


async def _send_error(
    stream: ResponseSink, status: int, message: str, code: str, retry_after_s: int | None = None
) -> None:
    retry = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    await _send_json(stream, status, error_body(status, message, code), retry)
