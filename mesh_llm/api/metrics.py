"""Prometheus metrics of one node's API (`GET /metrics`), in a registry of its own.

`ApiMetrics` owns a `CollectorRegistry` per app, so several nodes (or tests) in one process never
share series. The proxy reports each request through `request_started(model, route)`, which
returns a `RequestObservation`: call `response_head(status, content_type)` when the upstream
answers, `body_chunk(chunk)` for every chunk relayed (the first marks time to first byte; tokens
are counted as in `token_count`), and `finished(status)` at the end — or use it as a context
manager, which finishes it on any exit (499 when the client went away, 500 on an error).
Refusals that never reach a backend (404, 503, 429) go through `request_refused`.
Gauges that belong to other parts (peers, backend states, tunnel bytes, queue depth) are read
from callables in `MetricSources` at scrape time. Must not import the proxy or the router.

Metric names: see `METRIC_NAMES` (and README.md).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh_llm.api.token_count import NoTokenCounter, TokenCounter, counter_for

log = logging.getLogger(__name__)

RouteKind = Literal["local", "remote", "none"]  # "none": refused before reaching a backend
CLIENT_CLOSED_STATUS = 499  # nginx's convention for "the client went away first"
ERROR_STATUS = 500
DURATION_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
FIRST_BYTE_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
METRIC_NAMES = (
    "mesh_llm_requests_total",
    "mesh_llm_request_duration_seconds",
    "mesh_llm_time_to_first_byte_seconds",
    "mesh_llm_tokens_generated_total",
    "mesh_llm_requests_in_flight",
    "mesh_llm_queue_depth",
    "mesh_llm_queue_capacity",
    "mesh_llm_peers",
    "mesh_llm_backend_state",
    "mesh_llm_tunnel_bytes_total",
    "mesh_llm_peer_requests_total",
)


@dataclass(frozen=True, slots=True)
class MetricSources:
    """Read at every scrape; None leaves the metric out."""

    peer_count: Callable[[], int] | None = None
    backend_states: Callable[[], Mapping[str, str]] | None = None  # model → state
    # (worker, direction "up"/"down") → bytes its RPC tunnel carried
    tunnel_bytes: Callable[[], Mapping[tuple[str, str], int]] | None = None
    queue_depth: Callable[[], Mapping[str, int]] | None = None  # model → requests in flight
    queue_capacity: int | None = None


class ApiMetrics:
    """The metrics of one API app; `render()` gives the Prometheus text exposition."""

    CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

    def __init__(
        self, sources: MetricSources, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._clock = clock
        by_route = ("model", "route")
        self.requests = Counter(
            "mesh_llm_requests",
            "API requests by model, route (local/remote/none) and HTTP status",
            (*by_route, "status"),
            registry=self.registry,
        )
        self.duration = Histogram(
            "mesh_llm_request_duration_seconds",
            "Time from receiving a request to the end of its response",
            by_route,
            buckets=DURATION_BUCKETS_S,
            registry=self.registry,
        )
        self.first_byte = Histogram(
            "mesh_llm_time_to_first_byte_seconds",
            "Time from receiving a request to the first response body byte from the backend",
            by_route,
            buckets=FIRST_BYTE_BUCKETS_S,
            registry=self.registry,
        )
        self.tokens = Counter(
            "mesh_llm_tokens_generated",
            "Generated tokens: SSE events with text, or usage.completion_tokens of JSON answers",
            ("model",),
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "mesh_llm_requests_in_flight",
            "Requests being answered now",
            by_route,
            registry=self.registry,
        )
        self.peer_requests = Counter(
            "mesh_llm_peer_requests",
            "Requests this node answered for other nodes (over the fast lane or QUIC)",
            ("model", "status"),
            registry=self.registry,
        )
        self.registry.register(_SourcesCollector(sources))

    def peer_request(self, model: str, status: int) -> None:
        """Count a request another node sent here (`model` "" unless it is a known name)."""
        self.peer_requests.labels(model, str(status)).inc()

    def request_started(
        self, model: str, route: RouteKind, *, started: float | None = None
    ) -> RequestObservation:
        """Start observing one request that goes to a backend (`model` must be a known name);
        `started` (this clock) is when the request arrived, default now."""
        return RequestObservation(self, model, route, self._clock() if started is None else started)

    def request_refused(self, model: str, route: RouteKind, status: int) -> None:
        """Count a request answered without a backend (unknown model ⇒ pass model="")."""
        self.requests.labels(model, route, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def now(self) -> float:
        return self._clock()


class RequestObservation:
    """One request's metrics; every method is cheap and safe to call more than once."""

    def __init__(self, metrics: ApiMetrics, model: str, route: RouteKind, started: float) -> None:
        self._metrics = metrics
        self._labels = (model, route)
        self._started = started
        self._status: int | None = None
        self._counter: TokenCounter = NoTokenCounter()
        self._first_byte_seen = False
        self._done = False
        metrics.in_flight.labels(*self._labels).inc()

    def reroute(self, route: RouteKind) -> None:
        """The request was retried on a backend of another kind (local ⇄ remote)."""
        if self._done or route == self._labels[1]:
            return
        self._metrics.in_flight.labels(*self._labels).dec()
        self._labels = (self._labels[0], route)
        self._metrics.in_flight.labels(*self._labels).inc()

    def response_head(self, status: int, content_type: str) -> None:
        """The backend answered with this status and `Content-Type`."""
        self._status = status
        self._counter = counter_for(content_type)

    def first_byte(self) -> None:
        if not self._first_byte_seen:
            self._first_byte_seen = True
            elapsed = self._metrics.now() - self._started
            self._metrics.first_byte.labels(*self._labels).observe(elapsed)

    def body_chunk(self, chunk: bytes) -> None:
        """A chunk of the response body was relayed to the client."""
        self.first_byte()
        self.tokens(self._counter.feed(chunk))

    def tokens(self, count: int) -> None:
        if count > 0:
            self._metrics.tokens.labels(self._labels[0]).inc(count)

    def finished(self, status: int | None = None) -> None:
        """The response ended with `status` (default: the head's status)."""
        if self._done:
            return
        self._done = True
        self.tokens(self._counter.finish())
        final = status if status is not None else (self._status or ERROR_STATUS)
        metrics = self._metrics
        metrics.in_flight.labels(*self._labels).dec()
        metrics.requests.labels(*self._labels, str(final)).inc()
        metrics.duration.labels(*self._labels).observe(metrics.now() - self._started)

    def __enter__(self) -> RequestObservation:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if kind is None:
            self.finished()
        elif issubclass(kind, asyncio.CancelledError):
            self.finished(CLIENT_CLOSED_STATUS)
        else:
            self.finished(ERROR_STATUS)


class _SourcesCollector(Collector):
    """Gauges read from the node at scrape time."""

    def __init__(self, sources: MetricSources) -> None:
        self._sources = sources

    def describe(self) -> list[Metric]:
        return []  # series come and go with peers and models: nothing to check up front

    def collect(self) -> Iterator[Metric]:
        for build in (self._peers, self._backends, self._tunnels, self._queue):
            try:
                yield from build()
            except Exception:
                # A broken source must not take the whole scrape down; the others still report.
                log.exception("a metrics source failed during a scrape (%s)", build.__name__)

    def _peers(self) -> Iterator[Metric]:
        if self._sources.peer_count is not None:
            yield GaugeMetricFamily(
                "mesh_llm_peers",
                "Peers this node has a live link to",
                value=self._sources.peer_count(),
            )

    def _backends(self) -> Iterator[Metric]:
        if self._sources.backend_states is None:
            return
        family = GaugeMetricFamily(
            "mesh_llm_backend_state",
            "1 for the current state of each model this node knows",
            labels=("model", "state"),
        )
        for model, state in self._sources.backend_states().items():
            family.add_metric((model, state), 1)
        yield family

    def _tunnels(self) -> Iterator[Metric]:
        if self._sources.tunnel_bytes is None:
            return
        family = CounterMetricFamily(
            "mesh_llm_tunnel_bytes",
            "Bytes carried by the RPC tunnels to workers (up: host to worker)",
            labels=("worker", "direction"),
        )
        for (worker, direction), count in self._sources.tunnel_bytes().items():
            family.add_metric((worker, direction), count)
        yield family

    def _queue(self) -> Iterator[Metric]:
        if self._sources.queue_depth is not None:
            family = GaugeMetricFamily(
                "mesh_llm_queue_depth",
                "Requests in flight on this node's backends, per model (admission counter)",
                labels=("model",),
            )
            for model, depth in self._sources.queue_depth().items():
                family.add_metric((model,), depth)
            yield family
        if self._sources.queue_capacity is not None:
            yield GaugeMetricFamily(
                "mesh_llm_queue_capacity",
                "Requests one local model may have in flight before 429 (--queue-depth)",
                value=self._sources.queue_capacity,
            )
