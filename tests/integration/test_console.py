"""The console app over the real API app and a fake llama-server, on 127.0.0.1 ports.

`/api/chat` goes through the API's own `Proxy` (the request reaches the backend as
`/v1/chat/completions`, errors are the API's); `/api/events` opens with a snapshot and carries
mesh events logged by the node and status updates; every answer carries the CSP; `--headless`
removes the page only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from mesh_llm.api.app import PROXY_KEY, create_app
from mesh_llm.api.console import CONTENT_SECURITY_POLICY, create_console_app
from mesh_llm.config import ApiConfig, Config
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from tests.fakes.fake_llama import CHAT_REPLY, MODEL_ID, FakeLlama, serve

CONFIG = ApiConfig(port=0, retry_after_s=7, first_byte_timeout_s=10.0, idle_chunk_timeout_s=10.0)
LOADING = ModelStatus(ModelName("loading-model"), ModelState.LOADING, "downloading 40%")
EVENT_DEADLINE_S = 5.0
log = logging.getLogger("mesh_llm.test_console")


class Node:
    """The seams the console and the API read: model statuses and a status document."""

    def __init__(self) -> None:
        self.statuses: list[ModelStatus] = []
        self.extra: dict[str, Any] = {}

    def model_statuses(self) -> Sequence[ModelStatus]:
        return self.statuses

    def status(self) -> dict[str, Any]:
        return {
            "node": {"node_id": "a" * 64, "short_id": "a" * 10, "name": "<b>host</b>"},
            "token": "TOKEN",
            "models": [{"name": s.name, "state": s.state.value, "nodes": 1} for s in self.statuses],
            "peers": [],
            "records": [{"node_id": "a" * 64, "name": "<b>host</b>", "vram_bytes": 8}],
            **self.extra,
        }


@dataclass
class Stack:
    node: Node
    fake: FakeLlama
    console_url: str
    client: aiohttp.ClientSession


async def _stack(headless: bool = False) -> AsyncIterator[Stack]:
    async with AsyncExitStack() as stack:
        fake = FakeLlama(healthy=True)
        fake_url = await stack.enter_async_context(serve(fake.app()))
        node = Node()
        node.statuses = [
            ModelStatus(ModelName(MODEL_ID), ModelState.READY, endpoint=fake_url),
            LOADING,
        ]
        api = create_app(node, CONFIG)
        await stack.enter_async_context(serve(api))
        console = create_console_app(node, proxy=lambda: api[PROXY_KEY], headless=headless)
        url = await stack.enter_async_context(serve(console))
        client = await stack.enter_async_context(aiohttp.ClientSession())
        stack.callback(fake.release)
        yield Stack(node, fake, url, client)


@pytest.fixture
async def console() -> AsyncIterator[Stack]:
    async for stack in _stack():
        yield stack


CHAT = {"messages": [{"role": "user", "content": "hi"}]}


async def test_chat_goes_through_the_api_proxy_as_chat_completions(console: Stack) -> None:
    raw = json.dumps({**CHAT, "model": MODEL_ID}).encode()
    async with console.client.post(console.console_url + "/api/chat", data=raw) as response:
        assert response.status == 200
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert "X-Request-Id" in response.headers  # the proxy's answer, not a copy of it
        body = await response.json()
    assert body["choices"][0]["message"]["content"] == CHAT_REPLY
    [recorded] = console.fake.requests
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body == raw


async def test_chat_streams(console: Stack) -> None:
    body = {**CHAT, "stream": True}
    async with console.client.post(console.console_url + "/api/chat", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    assert text.count("data: ") >= 2 and "[DONE]" in text


@pytest.mark.parametrize(
    ("body", "status", "text"),
    [
        (b"{nope", 400, "not valid JSON"),
        (json.dumps({"messages": []}).encode(), 400, "must not be empty"),
        (json.dumps({**CHAT, "model": "unknown"}).encode(), 404, MODEL_ID),
        (json.dumps({**CHAT, "model": "loading-model"}).encode(), 503, "downloading 40%"),
    ],
)
async def test_chat_errors_are_the_apis(
    console: Stack, body: bytes, status: int, text: str
) -> None:
    async with console.client.post(console.console_url + "/api/chat", data=body) as response:
        assert response.status == status
        error = (await response.json())["error"]
        if status == 503:
            assert response.headers["Retry-After"] == "7"
    assert text in error["message"]


async def test_chat_before_the_api_is_up_is_503() -> None:
    async with AsyncExitStack() as stack:
        url = await stack.enter_async_context(serve(create_console_app(Node())))
        client = await stack.enter_async_context(aiohttp.ClientSession())
        async with client.post(url + "/api/chat", json=CHAT) as response:
            assert response.status == 503
            assert "not up yet" in (await response.json())["error"]["message"]


@pytest.mark.parametrize("path", ["/", "/static/main.js", "/api/status", "/missing"])
async def test_every_answer_carries_the_csp(console: Stack, path: str) -> None:
    async with console.client.get(console.console_url + path) as response:
        assert response.status == (404 if path == "/missing" else 200)
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        assert response.headers["X-Content-Type-Options"] == "nosniff"


async def test_status_carries_the_view(console: Stack) -> None:
    async with console.client.get(console.console_url + "/api/status") as response:
        status = await response.json()
    assert status["token"] == "TOKEN"
    [card] = status["view"]["nodes"]
    assert card["you"] and card["name"] == "<b>host</b>" and card["vram_share"] == 1.0


async def test_headless_has_no_page_but_the_api() -> None:
    async for stack in _stack(headless=True):
        for path, status in (("/", 404), ("/static/main.js", 404), ("/api/status", 200)):
            async with stack.client.get(stack.console_url + path) as response:
                assert response.status == status, path


class Events:
    """An open `/api/events` stream, read event by event."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response

    async def next(self) -> tuple[str, Any]:
        name, data = "", ""
        async with asyncio.timeout(EVENT_DEADLINE_S):
            while True:
                line = (await self._response.content.readline()).decode().rstrip("\n")
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    data = line.removeprefix("data: ")
                elif not line and name:
                    return name, json.loads(data)

    async def until(self, name: str) -> Any:
        while True:
            got, data = await self.next()
            if got == name:
                return data


async def test_events_open_with_a_snapshot_then_carry_events_and_status(
    console: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)  # what the node's logging set-up does
    log.info("before the page", extra={"event": "peer_joined", "peer": "b" * 64})
    async with console.client.get(console.console_url + "/api/events") as response:
        assert response.headers["Content-Type"] == "text/event-stream"
        assert response.headers["Content-Security-Policy"] == CONTENT_SECURITY_POLICY
        events = Events(response)
        name, snapshot = await events.next()
        assert name == "snapshot"
        assert snapshot["status"]["view"]["nodes"][0]["name"] == "<b>host</b>"
        assert [e["event"] for e in snapshot["events"]] == ["peer_joined"]
        log.warning("peer <i>x</i> is suspect", extra={"event": "peer_suspect", "peer": "x"})
        event = await events.until("event")
        assert event["event"] == "peer_suspect" and event["message"] == "peer <i>x</i> is suspect"
        assert event["level"] == "warning" and event["peer"] == "x"
        # From another thread (downloads and progress are logged there).
        thread = threading.Thread(target=lambda: log.info("50%", extra={"event": "progress"}))
        thread.start()
        thread.join()
        assert (await events.until("event"))["event"] == "progress"
        # A change is sent soon; nothing changing still sends status every
        # console_status_interval_s.
        console.node.extra = {"clients": 3}
        status = await events.until("status")
        assert status["view"]["clients"]["count"] == 3
        loop = asyncio.get_running_loop()
        started = loop.time()
        await events.until("status")
        assert loop.time() - started <= Config().console_status_interval_s + 1.0
