"""The node's HTTP API: OpenAI-compatible `/v1/*`, health and readiness.

`create_app` builds an aiohttp application over a `ModelDirectory` (what models exist and where
they are served). Each request is validated, routed by the pure `choose_route`, and streamed
through `proxy.forward`. Every error is OpenAI-shaped JSON, produced in one middleware. The API
answers from the first second of a node's life: 503 with `Retry-After` and a reason while
nothing is ready. Request ids, the API key, the queue depth (429) and `/metrics` are added by
`operations`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol

import aiohttp
from aiohttp import web

from mesh_llm.api import operations
from mesh_llm.api.metrics import MetricSources
from mesh_llm.api.openai import PROXIED_PATHS, InvalidRequest, error_body, validate_request
from mesh_llm.api.proxy import forward
from mesh_llm.api.request_id import request_id_of
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus, RouteRefused, choose_route

log = logging.getLogger(__name__)

UPSTREAM_CONNECTIONS_MAX = 256
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ModelDirectory(Protocol):
    """What the API needs from the node: the status of every model it knows."""

    def model_statuses(self) -> Sequence[ModelStatus]: ...


def create_app(
    directory: ModelDirectory, config: ApiConfig, sources: MetricSources | None = None
) -> web.Application:
    """The aiohttp application of the API (not yet bound to a socket).

    `sources` feeds node-wide gauges of `/metrics` (peers, tunnel bytes).
    """
    middlewares = operations.middlewares_around(_errors, config)
    app = web.Application(client_max_size=config.max_body_bytes, middlewares=middlewares)
    operations.install(app, directory, config, sources)
    api = _Api(directory, config)
    app.router.add_get("/v1/models", api.models)
    for path in PROXIED_PATHS:
        app.router.add_post(path, api.proxy)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.cleanup_ctx.append(_client_session)
    return app


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=UPSTREAM_CONNECTIONS_MAX)
    async with aiohttp.ClientSession(connector=connector) as session:
        app[SESSION_KEY] = session
        yield


def json_error(
    status: int, message: str, code: str, *, retry_after_s: int | None = None
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    return web.json_response(error_body(status, message, code), status=status, headers=headers)


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidRequest as exc:
        return web.json_response(
            error_body(400, str(exc), "invalid_request", exc.param), status=400
        )
    except web.HTTPRequestEntityTooLarge as exc:
        return json_error(400, f"request body too large: {exc.text}", "body_too_large")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        return json_error(exc.status, exc.reason, exc.reason.lower().replace(" ", "_"))


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
                "meta": {
                    "state": "warm" if m.state is ModelState.READY else "cold",
                    "status": m.state.value,
                    "reason": m.reason,
                    "nodes": 1 if m.state is ModelState.READY else 0,
                    "host": m.host,
                    "aliases": list(m.aliases),
                },
            }
            for m in self._directory.model_statuses()
        ]
        return web.json_response({"object": "list", "data": data})

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidRequest(f"the request body is not valid JSON: {exc}") from exc
        requested = validate_request(request.path, body)
        statuses = self._directory.model_statuses()
        route = choose_route(requested, statuses, retry_after_s=self._config.retry_after_s)
        if isinstance(route, RouteRefused):
            operations.count_refusal(request, requested, statuses, route.status)
            return json_error(
                route.status, route.message, route.code, retry_after_s=route.retry_after_s
            )
        log.debug("request %s %s → %s", request_id, request.path, route.endpoint)
        session = request.app[SESSION_KEY]
        return await operations.serve_admitted(
            request,
            route.model,
            "local",
            self._config,
            lambda observation: forward(
                request, session, route, raw, self._config, request_id, observation
            ),
        )

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(self, request: web.Request) -> web.Response:
        statuses = self._directory.model_statuses()
        ready = [m.name for m in statuses if m.state is ModelState.READY]
        if ready:
            return web.json_response({"status": "ready", "models": ready})
        reasons = "; ".join(f"{m.name}: {m.reason or m.state.value}" for m in statuses)
        return json_error(
            503,
            f"no model is ready yet ({reasons or 'no model configured'})",
            "not_ready",
            retry_after_s=self._config.retry_after_s,
        )
