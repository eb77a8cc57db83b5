"""Streaming proxy of one OpenAI request to a llama-server endpoint.

Forwards the already-validated body and streams the response back chunk by chunk as it arrives
(no buffering of whole responses). Timeouts are per phase: connect, first byte, idle between
chunks — never one total timeout over a stream. When the client goes away the handler is
cancelled and the upstream connection is closed, which makes llama-server stop generating.
Upstream failures before any byte was sent become a 502 OpenAI error; after bytes were sent, an
SSE stream ends with an error event.
"""

from __future__ import annotations

import asyncio
import json
import logging

import aiohttp
from aiohttp import web

from mesh_llm.api.metrics import RequestObservation
from mesh_llm.api.openai import error_body
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import Route

log = logging.getLogger(__name__)

_COPIED_HEADERS = ("Content-Type",)


async def forward(
    request: web.Request,
    session: aiohttp.ClientSession,
    route: Route,
    body: bytes,
    config: ApiConfig,
    request_id: str,
    observation: RequestObservation | None = None,
) -> web.StreamResponse:
    """Send `body` to `route` and stream the upstream answer back to `request`.

    `observation` (metrics) is told the response head and every chunk relayed.
    """
    url = route.endpoint + request.path
    timeout = aiohttp.ClientTimeout(
        total=None,
        sock_connect=config.upstream_connect_timeout_s,
        sock_read=config.idle_chunk_timeout_s,
    )
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    try:
        async with asyncio.timeout(config.first_byte_timeout_s):
            upstream = await session.post(url, data=body, headers=headers, timeout=timeout)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("request %s: upstream %s failed before answering: %r", request_id, url, exc)
        return web.json_response(
            error_body(502, f"the backend for {route.model} failed: {exc!r}", "upstream_failed"),
            status=502,
            headers={"X-Request-Id": request_id},
        )
    try:
        return await _relay(request, upstream, request_id, observation)
    finally:
        # close(), not release(): a half-read response must drop the connection so that
        # llama-server sees the disconnect and frees the slot.
        upstream.close()


async def _relay(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    request_id: str,
    observation: RequestObservation | None,
) -> web.StreamResponse:
    response = web.StreamResponse(status=upstream.status)
    for name in _COPIED_HEADERS:
        if name in upstream.headers:
            response.headers[name] = upstream.headers[name]
    response.headers["X-Request-Id"] = request_id
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    if is_sse:
        response.headers["Cache-Control"] = "no-cache"
    if observation is not None:
        observation.response_head(upstream.status, upstream.headers.get("Content-Type", ""))
    await response.prepare(request)
    try:
        async for chunk in upstream.content.iter_any():
            if observation is not None:
                observation.body_chunk(chunk)
            await response.write(chunk)
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("request %s: upstream failed mid-response: %r", request_id, exc)
        if is_sse:
            event = error_body(502, f"the backend failed mid-stream: {exc!r}", "upstream_failed")
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        return response
    await response.write_eof()
    return response
