"""The node's HTTP API: OpenAI-compatible `/v1/*`, health and readiness.

`create_app` builds an aiohttp application over a `ModelDirectory` (what models exist and where
they are served). Each request is validated, routed by the pure `choose_route`, and streamed
through `proxy.forward`. Every error is OpenAI-shaped JSON, produced in one middleware. The API
answers from the first second of a node's life: 503 with `Retry-After` and a reason while
nothing is ready. Also here: request ids (`request_id`), the API key (`auth`), the per-model
limit of requests in flight on local backends (`admission`, 429) and `/metrics` (`metrics`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Protocol, TypedDict

import aiohttp
from aiohttp import web

from mesh_llm.api.admission import LocalAdmission
from mesh_llm.api.auth import bearer_auth
from mesh_llm.api.metrics import ApiMetrics, MetricSources
from mesh_llm.api.openai import PROXIED_PATHS, InvalidRequest, error_body, validate_request
from mesh_llm.api.proxy import forward
from mesh_llm.api.request_id import add_request_id_header, request_id_of, request_ids
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus, RouteRefused, choose_route

log = logging.getLogger(__name__)

UPSTREAM_CONNECTIONS_MAX = 256
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
METRICS_KEY = web.AppKey("metrics", ApiMetrics)
ADMISSION_KEY = web.AppKey("admission", LocalAdmission)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ModelDirectory(Protocol):
    """What the API needs from the node: the status of every model it knows."""

    def model_statuses(self) -> Sequence[ModelStatus]: ...


def create_app(
    directory: ModelDirectory, config: ApiConfig, sources: MetricSources | None = None
) -> web.Application:
    """The aiohttp application of the API (not yet bound to a socket).

    `sources` feeds the node-wide gauges of `/metrics` (peers, tunnel bytes); backend states
    and queue depth come from `directory` and the app's own admission counter when not given.
    """
    auth = [bearer_auth(config.api_key)] if config.api_key is not None else []
    app = web.Application(
        client_max_size=config.max_body_bytes, middlewares=[request_ids, _errors, *auth]
    )
    app.on_response_prepare.append(add_request_id_header)
    admission = app[ADMISSION_KEY] = LocalAdmission(config.queue_depth)
    metrics = app[METRICS_KEY] = ApiMetrics(_sources(directory, admission, sources))
    api = _Api(directory, config, admission, metrics)
    app.router.add_get("/v1/models", api.models)
    for path in PROXIED_PATHS:
        app.router.add_post(path, api.proxy)
    app.router.add_get("/healthz", api.healthz)
    app.router.add_get("/readyz", api.readyz)
    app.router.add_get("/metrics", api.metrics)
    app.cleanup_ctx.append(_client_session)
    return app


class HttpLimits(TypedDict):
    """aiohttp request-handler arguments that bound a request's head."""

    max_line_size: int
    max_field_size: int
    max_headers: int


def http_limits(config: ApiConfig) -> HttpLimits:
    """The head limits of the API's server (over a limit: 400 before any handler runs)."""
    return HttpLimits(
        max_line_size=config.max_header_line_bytes,
        max_field_size=config.max_header_field_bytes,
        max_headers=config.max_headers,
    )


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


def _sources(
    directory: ModelDirectory, admission: LocalAdmission, given: MetricSources | None
) -> MetricSources:
    def backend_states() -> dict[str, str]:
        return {m.name: m.state.value for m in directory.model_statuses() if m.host == "local"}

    def queue_depth() -> dict[str, int]:
        return {**dict.fromkeys(backend_states(), 0), **admission.in_flight()}

    given = given or MetricSources()
    return dataclasses.replace(
        given,
        backend_states=given.backend_states or backend_states,
        queue_depth=given.queue_depth or queue_depth,
        queue_capacity=admission.depth,
    )


class _Api:
    def __init__(
        self,
        directory: ModelDirectory,
        config: ApiConfig,
        admission: LocalAdmission,
        metrics: ApiMetrics,
    ) -> None:
        self._directory = directory
        self._config = config
        self._admission = admission
        self._metrics = metrics

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
            known = {m.name for m in statuses}  # never a label from an unknown client string
            model_label = requested if requested is not None and requested in known else ""
            self._metrics.request_refused(model_label, "none", route.status)
            return json_error(
                route.status, route.message, route.code, retry_after_s=route.retry_after_s
            )
        release = self._admission.try_acquire(route.model)
        if release is None:
            self._metrics.request_refused(route.model, "local", 429)
            return json_error(
                429,
                f"{route.model} on this node has {self._admission.depth} requests in flight "
                f"(the queue depth); retry shortly",
                "queue_full",
                retry_after_s=self._config.busy_retry_after_s,
            )
        log.debug("request %s %s → %s", request_id, request.path, route.endpoint)
        session = request.app[SESSION_KEY]
        try:
            with self._metrics.request_started(route.model, "local") as observation:
                response = await forward(
                    request, session, route, raw, self._config, request_id, observation
                )
                observation.finished(response.status)
                return response
        finally:
            release()

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(
            body=self._metrics.render(), headers={"Content-Type": ApiMetrics.CONTENT_TYPE}
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
