"""The operational layer of the API app: request ids, API key, head limits, queue depth, metrics.

`create_app` calls `middlewares_around(errors, config)` and `install(app, directory, config,
sources)`, which puts one `LocalAdmission` (per-model queue depth of this node's backends,
shared by the proxy and by requests other nodes send over QUIC) and one `ApiMetrics` on the app;
the node passes `http_limits(config)` to its `AppRunner`. `queue_full` is the 429 answer.
Imports neither the proxy nor the router's decisions: they decide, this module accounts.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, TypedDict

from aiohttp import web
from aiohttp.typedefs import Middleware

from mesh_llm.api.admission import LocalAdmission
from mesh_llm.api.auth import bearer_auth
from mesh_llm.api.metrics import ApiMetrics, MetricSources
from mesh_llm.api.openai import error_body
from mesh_llm.api.request_id import add_request_id_header, request_ids
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelStatus

METRICS_KEY = web.AppKey("metrics", ApiMetrics)
ADMISSION_KEY = web.AppKey("admission", LocalAdmission)
QUEUE_FULL_STATUS = 429


class _Statuses(Protocol):
    def model_statuses(self) -> Sequence[ModelStatus]: ...


class HttpLimits(TypedDict):
    """aiohttp request-handler arguments that bound a request's head."""

    max_line_size: int
    max_field_size: int
    max_headers: int
    keepalive_timeout: float


def http_limits(config: ApiConfig) -> HttpLimits:
    """The head limits of the API's server (over a limit: 400 before any handler runs), and
    how long a connection may take to send its head or sit idle (aiohttp arms its keep-alive
    timer when the connection opens)."""
    return HttpLimits(
        max_line_size=config.max_header_line_bytes,
        max_field_size=config.max_header_field_bytes,
        max_headers=config.max_headers,
        keepalive_timeout=config.head_and_idle_timeout_s,
    )


def middlewares_around(errors: Middleware, config: ApiConfig) -> list[Middleware]:
    """Request ids outermost (even errors carry one), then `errors`, then the API key."""
    auth = [bearer_auth(config.api_key)] if config.api_key is not None else []
    return [request_ids, errors, *auth]


def install(
    app: web.Application, directory: _Statuses, config: ApiConfig, sources: MetricSources | None
) -> None:
    """Add the request-id header, the admission counter, the metrics and `GET /metrics`."""
    app.on_response_prepare.append(add_request_id_header)
    admission = app[ADMISSION_KEY] = LocalAdmission(config.queue_depth)
    metrics = app[METRICS_KEY] = ApiMetrics(_sources(directory, admission, sources))

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": metrics.CONTENT_TYPE})

    app.router.add_get("/metrics", scrape)


def _sources(
    directory: _Statuses, admission: LocalAdmission, given: MetricSources | None
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


def queue_full_message(model: str, config: ApiConfig) -> str:
    return (
        f"{model} on this node already has {config.queue_depth} requests in flight (its queue "
        f"depth); retry after {config.busy_retry_after_s} s"
    )


def queue_full(model: str, config: ApiConfig, request_id: str) -> web.Response:
    """429 for a request to `model` when this node already has `queue_depth` in flight."""
    return web.json_response(
        error_body(QUEUE_FULL_STATUS, queue_full_message(model, config), "queue_full"),
        status=QUEUE_FULL_STATUS,
        headers={"Retry-After": str(config.busy_retry_after_s), "X-Request-Id": request_id},
    )
