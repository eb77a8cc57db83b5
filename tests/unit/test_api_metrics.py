"""`ApiMetrics`: request observations, refusals, scrape-time sources, separate registries."""

from __future__ import annotations

import asyncio
import json

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_llm.api.metrics import (
    CLIENT_CLOSED_STATUS,
    METRIC_NAMES,
    ApiMetrics,
    MetricSources,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def samples(metrics: ApiMetrics) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of a scrape, keyed by name and label set (parsed from the text format)."""
    text = metrics.render().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(metrics: ApiMetrics, name: str, **labels: str) -> float | None:
    return samples(metrics).get((name, frozenset(labels.items())))


def _sse(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"delta": {"content": text}}]}).encode() + b"\n\n"


def test_streamed_request_is_counted_with_ttfb_duration_and_tokens() -> None:
    clock = FakeClock()
    metrics = ApiMetrics(MetricSources(), clock=clock)
    observation = metrics.request_started("m", "local")
    assert value(metrics, "mesh_llm_requests_in_flight", model="m", route="local") == 1
    observation.response_head(200, "text/event-stream")
    clock.now += 0.02
    observation.body_chunk(_sse("a") + _sse("b")[:10])
    clock.now += 1.0
    observation.body_chunk(_sse("b")[10:] + b"data: [DONE]\n\n")
    observation.finished()
    observation.finished(500)  # a second finish changes nothing
    labels = {"model": "m", "route": "local"}
    assert value(metrics, "mesh_llm_requests_total", status="200", **labels) == 1
    assert value(metrics, "mesh_llm_requests_total", status="500", **labels) is None
    assert value(metrics, "mesh_llm_requests_in_flight", **labels) == 0
    assert value(metrics, "mesh_llm_tokens_generated_total", model="m") == 2
    assert value(metrics, "mesh_llm_time_to_first_byte_seconds_sum", **labels) == pytest.approx(
        0.02
    )
    assert value(metrics, "mesh_llm_time_to_first_byte_seconds_bucket", le="0.025", **labels) == 1
    assert value(metrics, "mesh_llm_time_to_first_byte_seconds_bucket", le="0.01", **labels) == 0
    assert value(metrics, "mesh_llm_request_duration_seconds_sum", **labels) == pytest.approx(1.02)
    assert value(metrics, "mesh_llm_request_duration_seconds_count", **labels) == 1


def test_json_answer_counts_usage_tokens() -> None:
    metrics = ApiMetrics(MetricSources())
    with metrics.request_started("m", "remote") as observation:
        observation.response_head(200, "application/json")
        observation.body_chunk(b'{"choices": [], "usage": {"completion_tokens": 12}}')
    assert value(metrics, "mesh_llm_tokens_generated_total", model="m") == 12
    assert value(metrics, "mesh_llm_requests_total", model="m", route="remote", status="200") == 1


async def test_cancelled_request_counts_as_client_closed() -> None:
    metrics = ApiMetrics(MetricSources())

    async def handler() -> None:
        with metrics.request_started("m", "local") as observation:
            observation.response_head(200, "text/event-stream")
            await asyncio.Event().wait()

    task = asyncio.create_task(handler())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    labels = {"model": "m", "route": "local"}
    assert value(metrics, "mesh_llm_requests_total", status=str(CLIENT_CLOSED_STATUS), **labels)
    assert value(metrics, "mesh_llm_requests_in_flight", **labels) == 0


def test_error_inside_the_observation_counts_500() -> None:
    metrics = ApiMetrics(MetricSources())
    with pytest.raises(RuntimeError), metrics.request_started("m", "local"):
        raise RuntimeError("boom")
    assert value(metrics, "mesh_llm_requests_total", model="m", route="local", status="500") == 1


def test_refusals_are_counted_without_latency() -> None:
    metrics = ApiMetrics(MetricSources())
    metrics.request_refused("m", "local", 429)
    metrics.request_refused("", "none", 404)
    assert value(metrics, "mesh_llm_requests_total", model="m", route="local", status="429") == 1
    assert value(metrics, "mesh_llm_requests_total", model="", route="none", status="404") == 1
    assert (
        value(metrics, "mesh_llm_request_duration_seconds_count", model="m", route="local") is None
    )


def test_sources_are_read_at_scrape_time() -> None:
    peers = [2]
    metrics = ApiMetrics(
        MetricSources(
            peer_count=lambda: peers[0],
            backend_states=lambda: {"m": "ready", "n": "loading"},
            tunnel_bytes=lambda: {("abc", "up"): 1234},
            queue_depth=lambda: {"m": 3},
            queue_capacity=64,
        )
    )
    assert value(metrics, "mesh_llm_peers") == 2
    peers[0] = 5
    assert value(metrics, "mesh_llm_peers") == 5
    assert value(metrics, "mesh_llm_backend_state", model="m", state="ready") == 1
    assert value(metrics, "mesh_llm_backend_state", model="n", state="loading") == 1
    assert value(metrics, "mesh_llm_tunnel_bytes_total", worker="abc", direction="up") == 1234
    assert value(metrics, "mesh_llm_queue_depth", model="m") == 3
    assert value(metrics, "mesh_llm_queue_capacity") == 64


def test_a_failing_source_leaves_the_others(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> int:
        raise RuntimeError("no peers today")

    metrics = ApiMetrics(MetricSources(peer_count=broken, queue_capacity=8))
    assert value(metrics, "mesh_llm_queue_capacity") == 8
    assert value(metrics, "mesh_llm_peers") is None
    assert "metrics source failed" in caplog.text


def test_every_documented_name_is_exposed_and_registries_are_separate() -> None:
    full = MetricSources(lambda: 1, lambda: {"m": "ready"}, lambda: {("w", "up"): 1}, lambda: {}, 1)
    first, second = ApiMetrics(full), ApiMetrics(full)
    first.request_started("m", "local").finished(200)
    first.request_started("m", "local").first_byte()
    text = first.render().decode()
    families = {f.name for f in text_string_to_metric_families(text)}
    for name in METRIC_NAMES:
        assert name.removesuffix("_total") in families, name
    assert value(second, "mesh_llm_requests_total", model="m", route="local", status="200") is None
