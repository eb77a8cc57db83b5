"""The node's HTTP API: OpenAI-compatible `/v1/*`, health and readiness.

`create_app` builds an aiohttp application over a `ModelDirectory` (what models exist and where
they are served) and, on a mesh node, a `MeshAccess` (how to reach other hosts). Each request is
validated, then routed and streamed by `proxy.Proxy` (local backend or another node, with
failover). Every error is OpenAI-shaped JSON, Anthropic-shaped on the Anthropic paths
(`api/anthropic`). `/v1/models` lists every model with the endpoints it can answer. The API
answers from the first second of a node's life: 503 with `Retry-After` and a reason while
nothing is ready. The app also owns the `InboundRequests` server that answers other nodes'
requests over QUIC (same HTTP session).
Request ids, the API key, head limits, the queue depth (429) and `/metrics` come from
`operations`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
from aiohttp import web

from mesh_llm.api import operations
from mesh_llm.api.anthropic import ANTHROPIC_PATHS, translate_error
from mesh_llm.api.drain import Drain, drain_middleware
from mesh_llm.api.inbound import DROP_PATH, DropHandler, InboundRequests
from mesh_llm.api.metrics import MetricSources
from mesh_llm.api.openai import (
    CHAT_PATH,
    COMPLETIONS_PATH,
    INFILL_PATH,
    MESSAGES_PATH,
    PROXIED_PATHS,
    RESPONSES_PATH,
    error_body,
    validate_request,
)
from mesh_llm.api.proxy import MeshAccess, ModelDirectory, Proxy, json_error
from mesh_llm.api.request_id import request_id_of
from mesh_llm.config import ApiConfig
from mesh_llm.core.affinity import prefix_keys
from mesh_llm.errors import BodyTimeout, InvalidRequest

log = logging.getLogger(__name__)

UPSTREAM_CONNECTIONS_MAX = 256
LOOPBACK_PEERS = frozenset({"127.0.0.1", "::1"})
PROXY_KEY = web.AppKey("proxy", Proxy)
INBOUND_KEY = web.AppKey("inbound", InboundRequests)
# Paths that process a prompt into the KV cache: worth steering to the replica holding it.
AFFINITY_PATHS = frozenset(
    {CHAT_PATH, COMPLETIONS_PATH, RESPONSES_PATH, MESSAGES_PATH, INFILL_PATH}
)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

__all__ = ["INBOUND_KEY", "PROXY_KEY", "ModelDirectory", "create_app", "json_error"]


def create_app(
    directory: ModelDirectory,
    config: ApiConfig,
    mesh: MeshAccess | None = None,
    sources: MetricSources | None = None,
    *,
    drain: Drain | None = None,
    peer_drop: DropHandler | None = None,
) -> web.Application:
    """The aiohttp application of the API (not yet bound to a socket).

    `sources` feeds node-wide gauges of `/metrics` (peers, tunnel bytes). `drain` (the node's)
    counts the requests in flight, local and from other nodes, and refuses new ones with 503
    while the node stops; `peer_drop` answers a drop another node forwards here.
    """
    middlewares = operations.middlewares_around(_errors, config)
    if drain is not None:  # outermost, so a draining node refuses before any other work
        middlewares.insert(0, drain_middleware(drain, PROXIED_PATHS, config.retry_after_s))
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    operations.install(app, directory, config, sources)
    metrics, admission = app[operations.METRICS_KEY], app[operations.ADMISSION_KEY]
    api = _Api(directory, config)

    async def client_session(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=UPSTREAM_CONNECTIONS_MAX, keepalive_timeout=config.upstream_keepalive_s
        )
        async with aiohttp.ClientSession(connector=connector) as session:
            app[PROXY_KEY] = Proxy(directory, mesh, session, config, metrics, admission)
            app[INBOUND_KEY] = InboundRequests(
                directory, session, config, admission, metrics, peer_drop, drain
            )
            yield

    app.router.add_get("/v1/models", api.models)
    for path in PROXIED_PATHS:
        app.router.add_post(path, api.proxy)
    if mesh is not None:
        app.router.add_post(DROP_PATH, _drop_handler(mesh, config))
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.cleanup_ctx.append(client_session)
    return app


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Exceptions ⇒ errors in the path's dialect (OpenAI; Anthropic on its paths)."""
    response = await _openai_errors(request, handler)
    if (
        request.path in ANTHROPIC_PATHS
        and response.status >= 400
        and isinstance(response, web.Response)
        and not response.prepared
        and isinstance(response.body, bytes)
    ):
        headers = {k: v for k, v in response.headers.items() if k.lower() != "content-length"}
        return web.Response(
            body=translate_error(response.status, response.body),
            status=response.status,
            headers={**headers, "Content-Type": "application/json"},
        )
    return response


async def _openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Exceptions ⇒ OpenAI-shaped errors. Requests to the model endpoints refused here (400)
    or by the API key (401, the middleware inside this one) are counted in `/metrics` with
    model "" and route "none"; everything past validation is counted by the proxy."""
    try:
        response = await handler(request)
    except InvalidRequest as exc:
        response = web.json_response(
            error_body(400, str(exc), "invalid_request", exc.param), status=400
        )
    except BodyTimeout as exc:
        response = json_error(408, str(exc), "body_timeout")
        response.force_close()
    except web.HTTPRequestEntityTooLarge as exc:
        response = json_error(400, f"request body too large: {exc.text}", "body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason, exc.reason.lower().replace(" ", "_"))
    else:
        if response.status != 401:
            return response
    if request.path in PROXIED_PATHS:
        request.app[operations.METRICS_KEY].request_refused("", "none", response.status)
    return response


async def read_body(request: web.Request, config: ApiConfig) -> bytes:
    """The whole request body; raises `BodyTimeout` past `config.body_read_timeout_s`."""
    try:
        async with asyncio.timeout(config.body_read_timeout_s):
            return await request.read()
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within {config.body_read_timeout_s:g} s"
        ) from None


def _drop_handler(mesh: MeshAccess, config: ApiConfig) -> Handler:
    async def drop(request: web.Request) -> web.StreamResponse:
        if request.remote not in LOOPBACK_PEERS:
            return json_error(403, "/mesh/drop is only answered on loopback", "forbidden")
        try:
            body = json.loads(await read_body(request, config))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
        model = body.get("model") if isinstance(body, dict) else None
        if not isinstance(model, str) or not model:
            raise InvalidRequest("'model' (a string) is required", "model")
        status, document = await mesh.drop(model)
        return web.json_response(document, status=status)

    return drop


class _Api:
    def __init__(self, directory: ModelDirectory, config: ApiConfig) -> None:
        self._directory = directory
        self._config = config

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {
                "id": m.name,
                "object": "model",
                "created": int(time.time()),
                "owned_by": "mesh-llm",
                "capabilities": [c.value for c in m.capabilities],
                "meta": {
                    "state": "warm" if m.routable else "cold",
                    "status": m.state.value,
                    "reason": m.reason,
                    "nodes": m.node_count,
                    "host": m.host,
                    "aliases": list(m.aliases),
                },
            }
            for m in self._directory.model_statuses()
        ]
        return web.json_response({"object": "list", "data": data})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        raw = await read_body(request, self._config)
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
        requested = validate_request(request.path, body)
        keys: tuple[bytes, ...] = ()
        if self._config.prefix_affinity and request.path in AFFINITY_PATHS:
            config = self._config
            keys = prefix_keys(
                body, chunk_chars=config.affinity_chunk_chars, max_chars=config.affinity_max_chars
            )
        return await request.app[PROXY_KEY].handle(request, requested, raw, request_id, keys)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        statuses = self._directory.model_statuses()
        ready = [m.name for m in statuses if m.routable]
        if ready:
            return web.json_response({"status": "ready", "models": ready})
        reasons = "; ".join(f"{m.name}: {m.reason or m.state.value}" for m in statuses)
        return json_error(
            503,
            f"no model is ready yet ({reasons or 'no model configured'})",
            "not_ready",
            retry_after_s=self._config.retry_after_s,
        )
