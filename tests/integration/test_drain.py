"""A node's drain over the real API app and a fake llama-server on 127.0.0.1.

While draining, a held stream runs to `[DONE]`, new model requests (from a local client and
from another node) get 503 `shutting_down`, and `wait_idle` returns only when the stream ended.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import pytest

from mesh_llm.api.app import INBOUND_KEY, create_app
from mesh_llm.api.drain import Drain
from mesh_llm.api.inbound import InboundRequests
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.wire.messages import HttpRequestHead
from tests.fakes.fake_llama import MODEL_ID, FakeLlama, serve
from tests.integration.test_api import CONFIG, DEADLINE_S, Directory

CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}], "stream": True}


@dataclass
class Draining:
    fake: FakeLlama
    drain: Drain
    url: str
    client: aiohttp.ClientSession
    inbound: InboundRequests


@pytest.fixture
async def draining() -> AsyncIterator[Draining]:
    async with AsyncExitStack() as stack:
        fake = FakeLlama(healthy=True, hold_last_chunk=True)
        fake_url = await stack.enter_async_context(serve(fake.app()))
        directory = Directory()
        drain = Drain()
        app = create_app(directory, CONFIG, drain=drain)
        url = await stack.enter_async_context(serve(app))
        inbound = app[INBOUND_KEY]
        assert inbound.drain is drain
        client = await stack.enter_async_context(aiohttp.ClientSession())
        stack.callback(fake.release)
        directory.statuses = [ModelStatus(ModelName(MODEL_ID), ModelState.READY, endpoint=fake_url)]
        yield Draining(fake, drain, url, client, inbound)


class Sink:
    """A `ResponseSink` that keeps what another node would receive."""

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.received = b""
        self.ended = False

    def head(self, status: int, headers: dict[str, str]) -> None:
        self.status, self.headers = status, headers

    async def body(self, chunk: bytes) -> None:
        self.received += chunk

    def end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        raise AssertionError("aborted")


async def test_stream_in_flight_finishes_and_new_requests_get_503(draining: Draining) -> None:
    async with draining.client.post(draining.url + "/v1/chat/completions", json=CHAT) as held:
        assert held.status == 200
        await held.content.readline()  # the first event: the stream is in flight
        assert draining.drain.active == 1
        draining.drain.start()
        assert not await draining.drain.wait_idle(0.1)  # the held stream keeps it busy
        async with draining.client.post(draining.url + "/v1/chat/completions", json=CHAT) as new:
            assert new.status == 503
            assert new.headers["Retry-After"] == str(CONFIG.retry_after_s)
            assert (await new.json())["error"]["code"] == "shutting_down"
        async with draining.client.get(draining.url + "/healthz") as health:
            assert health.status == 200  # only model requests are refused
        waiting = asyncio.create_task(draining.drain.wait_idle(DEADLINE_S))
        await asyncio.sleep(0)
        assert not waiting.done()
        draining.fake.release()
        async with asyncio.timeout(DEADLINE_S):
            rest = await held.content.read()
        assert rest.decode().strip().endswith("data: [DONE]")
        assert await waiting
    assert draining.drain.active == 0


async def test_another_nodes_request_gets_503_while_draining(draining: Draining) -> None:
    draining.drain.start()
    sink = Sink()
    head = HttpRequestHead("POST", "/v1/chat/completions", {"X-Request-Id": "r1"})
    await draining.inbound.answer(sink, head, json.dumps(CHAT).encode())
    assert sink.status == 503 and sink.ended
    assert sink.headers["Retry-After"] == str(CONFIG.retry_after_s)
    assert json.loads(sink.received)["error"]["code"] == "shutting_down"
    assert draining.fake.requests == []  # refused before reaching the backend
