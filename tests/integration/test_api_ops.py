"""API operations over a fake llama-server: API key, request ids, head and body limits,
`/metrics` and the per-model queue depth (429)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from mesh_llm.api.app import create_app
from mesh_llm.api.metrics import CLIENT_CLOSED_STATUS, MetricSources
from mesh_llm.api.operations import ADMISSION_KEY, http_limits
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.logs import RequestIdFilter
from tests.fakes import waiting
from tests.fakes.fake_llama import CHAT_REPLY, MODEL_ID, FakeLlama, serve
from tests.integration.test_api import CHAT, DEADLINE_S, LOADING, Directory, _error, _read_event

KEY = "test-key-123"
AUTH = {"Authorization": f"Bearer {KEY}"}
CONFIG = ApiConfig(
    port=0,
    max_body_bytes=64 * 1024,
    retry_after_s=7,
    busy_retry_after_s=2,
    queue_depth=1,
    api_key=KEY,
    max_header_field_bytes=1024,
    upstream_connect_timeout_s=2.0,
    first_byte_timeout_s=10.0,
    idle_chunk_timeout_s=10.0,
)


@dataclass
class Ops:
    fake: FakeLlama
    url: str
    client: aiohttp.ClientSession
    app: web.Application

    async def post(
        self, path: str, body: object, headers: dict[str, str] | None = None
    ) -> aiohttp.ClientResponse:
        return await self.client.post(self.url + path, json=body, headers=headers or AUTH)

    async def samples(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        async with self.client.get(self.url + "/metrics", headers=AUTH) as response:
            assert response.status == 200
            assert response.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await response.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def metric(self, name: str, **labels: str) -> float | None:
        return (await self.samples()).get((name, frozenset(labels.items())))


@pytest.fixture
async def ops() -> AsyncIterator[Ops]:
    async with AsyncExitStack() as stack:
        fake = FakeLlama(healthy=True)
        fake_url = await stack.enter_async_context(serve(fake.app()))
        ready = ModelStatus(ModelName(MODEL_ID), ModelState.READY, endpoint=fake_url)
        directory = Directory([ready, LOADING])
        app = create_app(directory, CONFIG, sources=MetricSources(peer_count=lambda: 3))
        url = await stack.enter_async_context(serve(app, **http_limits(CONFIG)))
        client = await stack.enter_async_context(aiohttp.ClientSession())
        stack.callback(fake.release)  # runs first: held streams end before the servers stop
        yield Ops(fake, url, client, app)


# -- API key -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({}, "missing API key"),
        ({"Authorization": "Bearer wrong"}, "invalid API key"),
        ({"Authorization": f"Basic {KEY}"}, "missing API key"),
        ({"Authorization": "Bearer "}, "missing API key"),
    ],
)
async def test_requests_without_the_key_are_401(
    ops: Ops, headers: dict[str, str], message: str
) -> None:
    for method, path in (
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("GET", "/v1/nothing"),
    ):
        async with ops.client.request(method, ops.url + path, json=CHAT, headers=headers) as r:
            assert r.status == 401, path
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert r.headers["X-Request-Id"]
            error = _error(await r.json())
        assert error["type"] == "authentication_error"
        assert error["code"] == "invalid_api_key"
        assert message in str(error["message"])
    assert ops.fake.requests == []
    # One of the four paths is a model endpoint: that refusal is counted (read with the key).
    labels = {"model": "", "route": "none", "status": "401"}
    assert await ops.metric("mesh_llm_requests_total", **labels) == 1


async def test_the_key_opens_the_api_and_probes_stay_open(ops: Ops) -> None:
    async with await ops.post("/v1/chat/completions", CHAT) as response:
        assert response.status == 200
    async with ops.client.get(
        ops.url + "/v1/models", headers={"authorization": f"bearer {KEY}"}
    ) as r:
        assert r.status == 200
    for probe in ("/healthz", "/readyz"):
        async with ops.client.get(ops.url + probe) as response:
            assert response.status == 200, probe
    assert len(ops.fake.requests) == 1


async def test_official_client_with_and_without_the_key(ops: Ops) -> None:
    base = ops.url + "/v1"
    async with openai.AsyncOpenAI(base_url=base, api_key=KEY, max_retries=0) as client:
        reply = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}]
        )
        assert reply.choices[0].message.content == CHAT_REPLY
    async with openai.AsyncOpenAI(base_url=base, api_key="nope", max_retries=0) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(
                model=MODEL_ID, messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"


# -- request ids and limits -----------------------------------------------------------------


async def test_request_id_on_every_response(ops: Ops) -> None:
    cases = [
        ("/v1/chat/completions", CHAT, 200),
        ("/v1/chat/completions", {**CHAT, "stream": True}, 200),
        ("/v1/chat/completions", {"model": MODEL_ID}, 400),
        ("/v1/chat/completions", {**CHAT, "model": "nope"}, 404),
        ("/v1/chat/completions", {**CHAT, "model": "loading-model"}, 503),
    ]
    for index, (path, body, status) in enumerate(cases):
        request_id = f"client-id-{index}"
        async with await ops.post(path, body, {**AUTH, "X-Request-Id": request_id}) as response:
            assert response.status == status
            assert response.headers["X-Request-Id"] == request_id
            await response.read()


async def test_unacceptable_request_id_is_replaced(ops: Ops) -> None:
    for bad in ("has space", "x" * 129, "new\\nline"):
        headers = {**AUTH, "X-Request-Id": bad}
        async with await ops.post("/v1/chat/completions", CHAT, headers) as response:
            assert response.status == 200
            given = response.headers["X-Request-Id"]
        assert given != bad and len(given) == 32
        assert ops.fake.requests[-1].headers["X-Request-Id"] == given


async def test_log_lines_of_a_request_carry_its_id(ops: Ops) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append  # type: ignore[method-assign,assignment]
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("mesh_llm.api")
    logger.addHandler(handler)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        headers = {**AUTH, "X-Request-Id": "traced-1"}
        async with await ops.post("/v1/chat/completions", CHAT, headers) as response:
            assert response.status == 200
    finally:
        logger.removeHandler(handler)
        logger.setLevel(old_level)
    mine = [r for r in records if getattr(r, "request_id", None) == "traced-1"]
    assert mine, [r.getMessage() for r in records]
    assert any("→" in r.getMessage() for r in mine)


async def test_chunked_body_over_the_limit_is_400(ops: Ops) -> None:
    async def body() -> AsyncIterator[bytes]:
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(CONFIG.max_body_bytes // 1024 + 1):
            yield b"x" * 1024
        yield b'"}]}'

    headers = {**AUTH, "Content-Type": "application/json"}
    async with ops.client.post(
        ops.url + "/v1/chat/completions", data=body(), headers=headers
    ) as response:
        assert response.status == 400
        error = _error(await response.json())
    assert error["code"] == "body_too_large"
    assert ops.fake.requests == []
    labels = {"model": "", "route": "none", "status": "400"}
    assert await ops.metric("mesh_llm_requests_total", **labels) == 1


async def test_header_over_the_limit_is_400_and_under_it_passes(ops: Ops) -> None:
    size = CONFIG.max_header_field_bytes
    async with await ops.post(
        "/v1/chat/completions", CHAT, {**AUTH, "X-Big": "y" * (size // 2)}
    ) as r:
        assert r.status == 200
    async with await ops.post(
        "/v1/chat/completions", CHAT, {**AUTH, "X-Big": "y" * (size + 1)}
    ) as r:
        assert r.status == 400
    assert len(ops.fake.requests) == 1


# -- metrics ----------------------------------------------------------------------------------


async def test_metrics_count_requests_tokens_and_sources(ops: Ops) -> None:
    local = {"model": MODEL_ID, "route": "local"}
    async with await ops.post("/v1/chat/completions", CHAT) as response:
        assert response.status == 200
        await response.read()
    async with await ops.post("/v1/chat/completions", {**CHAT, "stream": True}) as response:
        assert response.status == 200
        await response.read()
    async with await ops.post("/v1/chat/completions", {**CHAT, "model": "client-chosen"}) as r:
        assert r.status == 404
    async with await ops.post("/v1/chat/completions", {**CHAT, "model": "LOADING-model"}) as r:
        assert r.status == 503
    samples = await ops.samples()

    def get(name: str, **labels: str) -> float | None:
        return samples.get((name, frozenset(labels.items())))

    assert get("mesh_llm_requests_total", status="200", **local) == 2
    assert get("mesh_llm_requests_total", model="", route="none", status="404") == 1
    assert get("mesh_llm_requests_total", model="loading-model", route="none", status="503") == 1
    # 7 from the JSON answer's usage.completion_tokens, one per streamed chunk with content.
    assert get("mesh_llm_tokens_generated_total", model=MODEL_ID) == 7 + ops.fake.chunks
    assert get("mesh_llm_request_duration_seconds_count", **local) == 2
    assert get("mesh_llm_time_to_first_byte_seconds_count", **local) == 2
    assert get("mesh_llm_requests_in_flight", **local) == 0
    assert get("mesh_llm_peers") == 3
    assert get("mesh_llm_backend_state", model=MODEL_ID, state="ready") == 1
    assert get("mesh_llm_queue_depth", model=MODEL_ID) == 0
    assert get("mesh_llm_queue_capacity") == CONFIG.queue_depth
    assert not any(
        name == "mesh_llm_requests_total" and ("model", "client-chosen") in labels
        for name, labels in samples
    )


# -- queue depth ------------------------------------------------------------------------------


async def test_queue_full_is_429_until_a_slot_frees(ops: Ops) -> None:
    ops.fake.hold_last_chunk = True
    held = await ops.post("/v1/chat/completions", {**CHAT, "stream": True})
    try:
        assert held.status == 200
        await _read_event(held)
        assert await ops.metric("mesh_llm_queue_depth", model=MODEL_ID) == 1
        assert await ops.metric("mesh_llm_requests_in_flight", model=MODEL_ID, route="local") == 1
        async with await ops.post("/v1/chat/completions", CHAT) as refused:
            assert refused.status == 429
            assert refused.headers["Retry-After"] == str(CONFIG.busy_retry_after_s)
            assert refused.headers["X-Request-Id"]
            error = _error(await refused.json())
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "queue_full"
        assert MODEL_ID in str(error["message"])
        ops.fake.release()
        async with asyncio.timeout(DEADLINE_S):
            assert (await held.read()).endswith(b"data: [DONE]\n\n")
    finally:
        held.close()
    async with await ops.post("/v1/chat/completions", CHAT) as response:
        assert response.status == 200
    assert (
        await ops.metric("mesh_llm_requests_total", model=MODEL_ID, route="none", status="429") == 1
    )
    assert len(ops.fake.requests) == 2


async def test_client_disconnect_frees_the_slot_and_counts_499(ops: Ops) -> None:
    ops.fake.hold_last_chunk = True
    response = await ops.post("/v1/chat/completions", {**CHAT, "stream": True})
    try:
        assert response.status == 200
        assert json.loads(await _read_event(response))["choices"][0]["delta"]["content"]
    finally:
        response.close()
    await waiting.wait_until(lambda: ops.fake.cancelled == 1, "the upstream to be cancelled")
    admission = ops.app[ADMISSION_KEY]
    await waiting.wait_until(lambda: admission.in_flight() == {}, "the slot to be released")
    labels = {"model": MODEL_ID, "route": "local", "status": str(CLIENT_CLOSED_STATUS)}
    assert await ops.metric("mesh_llm_requests_total", **labels) == 1
    assert await ops.metric("mesh_llm_queue_depth", model=MODEL_ID) == 0
    ops.fake.hold_last_chunk = False
    async with await ops.post("/v1/chat/completions", CHAT) as again:
        assert again.status == 200
