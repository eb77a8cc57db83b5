"""Streaming proxy of one OpenAI request to the backend chosen for it, local or remote.

`Proxy.handle` asks the pure router for a backend (least in-flight, local first on ties; the
replica that last served the request's prompt prefix when it is not busier than its fair share,
from this node's `AffinityTable`), opens the upstream (`api/upstream.py`), and relays the
answer chunk by chunk, unbuffered.
Failover: when the upstream fails before its response head — the host died, its stream was
reset, its backend refused with 429/502/503 — the request is retried once on another replica
(or on a backend elected since), and a failed remote host is reported to the mesh at once. After
bytes were sent, an SSE stream ends with an OpenAI-style error event; a plain body is cut (the
connection is closed, so the client cannot mistake it for a whole answer). When the client goes
away, the handler is cancelled and the upstream is closed (a remote host's stream is broken
off), which makes llama-server stop generating.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from collections import Counter
from collections.abc import Sequence
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from mesh_llm.api.admission import LocalAdmission, Release
from mesh_llm.api.anthropic import ANTHROPIC_PATHS, stream_error_event, translate_error
from mesh_llm.api.metrics import (
    CLIENT_CLOSED_STATUS,
    ERROR_STATUS,
    ApiMetrics,
    RequestObservation,
    RouteKind,
)
from mesh_llm.api.openai import ENDPOINTS, error_body
from mesh_llm.api.operations import queue_full
from mesh_llm.api.upstream import (
    RemoteResponse,
    Upstream,
    UpstreamFailed,
    open_local,
    open_remote,
    request_head,
)
from mesh_llm.config import ApiConfig
from mesh_llm.core.affinity import AffinityTable
from mesh_llm.core.capabilities import Capability
from mesh_llm.core.router import (
    LOCAL,
    ModelStatus,
    Route,
    RouteRefused,
    choose_route,
    match_model,
)
from mesh_llm.wire.messages import HttpRequestHead

log = logging.getLogger(__name__)

SSE_DONE = b"data: [DONE]"  # the last event of an OpenAI stream
MAX_ATTEMPTS = 2  # the first choice, then one retry on another replica
RETRYABLE_STATUSES = frozenset({429, 502, 503})  # a host refused before producing anything
MAX_ERROR_BODY_BYTES = 64 * 1024  # an upstream error body read whole to be reshaped


class ModelDirectory(Protocol):
    """What the API needs from the node: the status of every model it knows."""

    def model_statuses(self) -> Sequence[ModelStatus]: ...


class MeshAccess(Protocol):
    """How the proxy reaches other nodes (absent on a node without a mesh, e.g. in tests)."""

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> RemoteResponse:
        """Send to `node_id` (over whichever lane reaches it) and wait for the response head
        (at most `first_byte_timeout_s` once it is reached); raises `MeshError` or
        `TimeoutError` when it failed."""
        ...

    def report_failure(self, node_id: str, reason: str) -> None: ...

    def count_request(self, model: str) -> None: ...

    async def drop(self, model: str) -> tuple[int, dict[str, Any]]:
        """`POST /mesh/drop`: the node serving `model` leaves; (HTTP status, JSON body)."""
        ...


def json_error(
    status: int,
    message: str,
    code: str,
    *,
    retry_after_s: int | None = None,
    request_id: str | None = None,
) -> web.Response:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else {}
    if request_id is not None:
        headers["X-Request-Id"] = request_id
    return web.json_response(error_body(status, message, code), status=status, headers=headers)


class Proxy:
    """Routes and relays API requests; owns this node's in-flight counts per backend."""

    def __init__(
        self,
        directory: ModelDirectory,
        mesh: MeshAccess | None,
        session: aiohttp.ClientSession,
        config: ApiConfig,
        metrics: ApiMetrics,
        admission: LocalAdmission,
    ) -> None:
        self._directory = directory
        self._metrics = metrics
        self._admission = admission
        self._mesh = mesh
        self._session = session
        self._config = config
        self._rotation = itertools.count()
        self.in_flight: Counter[str] = Counter()
        self.affinity = AffinityTable(
            max_entries=config.affinity_max_entries, ttl_s=config.affinity_ttl_s
        )

    async def handle(
        self,
        request: web.Request,
        requested: str | None,
        body: bytes,
        request_id: str,
        prefix_keys: Sequence[bytes] = (),
    ) -> web.StreamResponse:
        """Route and relay one validated request; `prefix_keys` are its prompt-prefix hashes
        (`core/affinity.prefix_keys`; empty: no affinity)."""
        started = self._metrics.now()
        statuses = self._directory.model_statuses()
        endpoint = ENDPOINTS.get(request.path)
        capability = endpoint.capability if endpoint is not None else None
        model = match_model(requested, statuses, capability)
        if model is not None and self._mesh is not None:
            self._mesh.count_request(model.name)
        attempt = _Attempt(self._metrics, model.name if model is not None else "", started)
        affinity = _Affinity(self.affinity, model.name if model else "", prefix_keys, capability)
        try:
            response = await self._route(
                request, requested, model, statuses, body, request_id, attempt, affinity
            )
        except asyncio.CancelledError:
            attempt.finished(CLIENT_CLOSED_STATUS)
            raise
        except BaseException:
            attempt.finished(ERROR_STATUS)
            raise
        attempt.finished(response.status)
        return response

    async def _route(
        self,
        request: web.Request,
        requested: str | None,
        model: ModelStatus | None,
        statuses: Sequence[ModelStatus],
        body: bytes,
        request_id: str,
        attempt: _Attempt,
        affinity: _Affinity,
    ) -> web.StreamResponse:
        rotation = next(self._rotation)
        exclude: set[str] = set()
        last_error = ""
        for number in range(MAX_ATTEMPTS):
            route = self._choose(requested, statuses, exclude, rotation, affinity)
            if isinstance(route, RouteRefused):
                message = f"{route.message} ({last_error})" if last_error else route.message
                status, code = route.status, route.code
                if last_error and status != 502:
                    status, code = 502, "upstream_failed"  # no other replica could take it
                return json_error(
                    status,
                    message,
                    code,
                    retry_after_s=route.retry_after_s if status in (503, 429) else None,
                    request_id=request_id,
                )
            release: Release | None = None
            if route.endpoint is not None:
                release = self._admission.try_acquire(route.model)
                if release is None:
                    last_error = f"the local queue of {route.model} is full"
                    if number + 1 < MAX_ATTEMPTS and self._has_other(
                        requested, {*exclude, LOCAL}, affinity
                    ):
                        log.info("request %s: %s; trying a replica", request_id, last_error)
                        exclude.add(LOCAL)
                        continue
                    return queue_full(route.model, self._config, request_id)
            log.debug("request %s %s → %s", request_id, request.path, _where(route))
            observation = attempt.on(route)
            self.in_flight[route.key] += 1
            try:
                try:
                    upstream = await self._open(route, request.path, body, request_id)
                except UpstreamFailed as exc:
                    last_error = str(exc)
                    log.warning("request %s: %s; %s", request_id, exc, _retry_note(number))
                    self._report(route, last_error)
                    self.affinity.forget(route.key)
                    exclude.add(route.key)
                    continue
                try:
                    retry = upstream.status in RETRYABLE_STATUSES and number + 1 < MAX_ATTEMPTS
                    if retry and self._has_other(requested, exclude | {route.key}, affinity):
                        last_error = f"{_where(route)} answered {upstream.status}"
                        log.info("request %s: %s; retrying elsewhere", request_id, last_error)
                        exclude.add(route.key)
                        continue
                    if upstream.status < 400:
                        affinity.served_by(route, self._now())
                    return await _relay(request, upstream, request_id, observation)
                finally:
                    upstream.close()
            finally:
                self.in_flight[route.key] -= 1
                if release is not None:
                    release()
        name = model.name if model is not None else requested
        return json_error(
            502,
            f"the backend for {name} failed and the retry failed too ({last_error})",
            "upstream_failed",
            request_id=request_id,
        )

    def _choose(
        self,
        requested: str | None,
        statuses: Sequence[ModelStatus],
        exclude: set[str],
        rotation: int,
        affinity: _Affinity,
    ) -> Route | RouteRefused:
        return choose_route(
            requested,
            statuses,
            retry_after_s=self._config.retry_after_s,
            in_flight=self.in_flight,
            exclude=exclude,
            rotation=rotation,
            capability=affinity.capability,
            preferred=affinity.preferred(self._now()) if self._config.prefix_affinity else None,
        )

    def _has_other(self, requested: str | None, exclude: set[str], affinity: _Affinity) -> bool:
        statuses = self._directory.model_statuses()
        return isinstance(self._choose(requested, statuses, exclude, 0, affinity), Route)

    def _now(self) -> float:
        return asyncio.get_running_loop().time()

    async def _open(self, route: Route, path: str, body: bytes, request_id: str) -> Upstream:
        if route.endpoint is not None:
            return await open_local(
                self._session, route.endpoint, path, body, request_id, self._config
            )
        assert route.node_id is not None
        if self._mesh is None:
            raise UpstreamFailed("this node has no mesh to reach other hosts")
        head = request_head(path, body, request_id)
        return await open_remote(self._mesh, route.node_id, head, body, self._config)

    def _report(self, route: Route, reason: str) -> None:
        if route.node_id is not None and self._mesh is not None:
            self._mesh.report_failure(route.node_id, reason)


def _where(route: Route) -> str:
    return f"node {route.node_id[:10]}" if route.node_id is not None else "the local backend"


def _retry_note(attempt: int) -> str:
    return "retrying on another replica" if attempt + 1 < MAX_ATTEMPTS else "giving up"


class _Affinity:
    """The prompt-prefix affinity of one request: which backend to prefer, and recording the
    backend that served it."""

    def __init__(
        self,
        table: AffinityTable,
        model: str,
        keys: Sequence[bytes],
        capability: Capability | None,
    ) -> None:
        self._table = table
        self._model = model
        self._keys = keys
        self.capability = capability

    def preferred(self, now: float) -> str | None:
        if not self._keys or not self._model:
            return None
        return self._table.lookup(self._model, self._keys, now)

    def served_by(self, route: Route, now: float) -> None:
        if self._keys:
            self._table.record(route.model, self._keys, route.key, now)


class _Attempt:
    """The metrics of one request across its attempts: refused before any backend (route
    "none"), or observed from the first backend tried, moved when a retry changes the route."""

    def __init__(self, metrics: ApiMetrics, model: str, started: float) -> None:
        self._metrics = metrics
        self._model = model
        self._started = started
        self._observation: RequestObservation | None = None

    def on(self, route: Route) -> RequestObservation:
        kind: RouteKind = "local" if route.endpoint is not None else "remote"
        if self._observation is None:
            self._observation = self._metrics.request_started(
                self._model, kind, started=self._started
            )
        else:
            self._observation.reroute(kind)
        return self._observation

    def finished(self, status: int) -> None:
        if self._observation is not None:
            self._observation.finished(status)
        else:
            self._metrics.request_refused(self._model, "none", status)


async def _relay(
    request: web.Request, upstream: Upstream, request_id: str, observation: RequestObservation
) -> web.StreamResponse:
    anthropic = request.path in ANTHROPIC_PATHS
    content_type = upstream.headers.get("Content-Type", "")
    if anthropic and upstream.status >= 400 and not content_type.startswith("text/event-stream"):
        return await _reshaped_error(upstream, request_id, observation)
    response = web.StreamResponse(status=upstream.status)
    for name, value in upstream.headers.items():
        response.headers[name] = value
    response.headers["X-Request-Id"] = request_id
    is_sse = upstream.headers.get("Content-Type", "").startswith("text/event-stream")
    if is_sse:
        response.headers["Cache-Control"] = "no-cache"
    observation.response_head(upstream.status, upstream.headers.get("Content-Type", ""))
    await response.prepare(request)
    delivered = False  # the client has the whole answer: an SSE stream's last event came
    try:
        async for chunk in upstream.chunks():
            observation.body_chunk(chunk)
            await response.write(chunk)
            delivered = is_sse and chunk.rstrip().endswith(SSE_DONE)
    except asyncio.CancelledError:
        if delivered:  # clients stop reading at [DONE]: a complete answer, not a cancellation
            observation.finished(upstream.status)
            upstream.finish()
        raise
    except UpstreamFailed as exc:
        log.warning("request %s: %s", request_id, exc)
        if is_sse and anthropic:
            await response.write(stream_error_event(str(exc)))
            await response.write_eof()
        elif is_sse:
            event = error_body(502, str(exc), "upstream_failed")
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
            await response.write_eof()
        elif request.transport is not None:
            request.transport.close()  # a cut body must not look complete
        return response
    await response.write_eof()
    return response


async def _reshaped_error(
    upstream: Upstream, request_id: str, observation: RequestObservation
) -> web.StreamResponse:
    """An upstream error on an Anthropic path, read whole and answered Anthropic-shaped."""
    observation.response_head(upstream.status, "application/json")
    raw = b""
    try:
        async for chunk in upstream.chunks():
            raw += chunk
            if len(raw) > MAX_ERROR_BODY_BYTES:
                break
    except UpstreamFailed as exc:
        raw = raw or str(exc).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
    if "Retry-After" in upstream.headers:
        headers["Retry-After"] = upstream.headers["Retry-After"]
    body = translate_error(upstream.status, raw[:MAX_ERROR_BODY_BYTES])
    return web.Response(body=body, status=upstream.status, headers=headers)
