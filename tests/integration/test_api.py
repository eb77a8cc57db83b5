"""The node's HTTP API over a fake llama-server, both on 127.0.0.1 with ephemeral ports."""

from __future__ import annotations

import asyncio
import functools
import json
import socket
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass

import aiohttp
import pytest
from openai import AsyncOpenAI

from mesh_llm.api.app import create_app
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from tests.fakes import waiting
from tests.fakes.fake_llama import CHAT_REPLY, MODEL_ID, FakeLlama, serve

DEADLINE_S = 5.0
wait_until = functools.partial(waiting.wait_until, timeout_s=DEADLINE_S)
LOADING = ModelStatus(ModelName("loading-model"), ModelState.LOADING, "downloading 40%")
CONFIG = ApiConfig(
    port=0,
    max_body_bytes=64 * 1024,
    retry_after_s=7,
    upstream_connect_timeout_s=2.0,
    first_byte_timeout_s=10.0,
    idle_chunk_timeout_s=10.0,
)


class Directory:
    """The `ModelDirectory` seam: a list of statuses the test edits."""

    def __init__(self, statuses: Sequence[ModelStatus] = ()) -> None:
        self.statuses = list(statuses)

    def model_statuses(self) -> Sequence[ModelStatus]:
        return self.statuses


@dataclass
class Stack:
    fake: FakeLlama
    directory: Directory
    url: str
    client: aiohttp.ClientSession
    fake_url: str

    def ready(self, name: str = MODEL_ID) -> ModelStatus:
        return ModelStatus(ModelName(name), ModelState.READY, endpoint=self.fake_url)

    async def post(self, path: str, body: object, **kwargs: object) -> aiohttp.ClientResponse:
        return await self.client.post(self.url + path, json=body, **kwargs)  # type: ignore[arg-type]


@pytest.fixture
async def stack() -> AsyncIterator[Stack]:
    async with AsyncExitStack() as exit_stack:
        fake = FakeLlama(healthy=True)
        fake_url = await exit_stack.enter_async_context(serve(fake.app()))
        directory = Directory()
        url = await exit_stack.enter_async_context(serve(create_app(directory, CONFIG)))
        client = await exit_stack.enter_async_context(aiohttp.ClientSession())
        # Registered last so it runs first: held streams finish before the servers stop.
        exit_stack.callback(fake.release)
        built = Stack(fake, directory, url, client, fake_url)
        directory.statuses = [built.ready(), LOADING]
        yield built


CHAT = {"model": MODEL_ID, "messages": [{"role": "user", "content": "hi"}]}


def _error(body: object) -> dict[str, object]:
    assert isinstance(body, dict)
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


async def test_models_lists_warm_and_cold(stack: Stack) -> None:
    async with stack.client.get(stack.url + "/v1/models") as response:
        assert response.status == 200
        body = await response.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {MODEL_ID, "loading-model"}
    assert by_id[MODEL_ID]["object"] == "model"
    assert by_id[MODEL_ID]["meta"]["state"] == "warm"
    assert by_id[MODEL_ID]["meta"]["nodes"] == 1
    assert by_id["loading-model"]["meta"]["state"] == "cold"
    assert by_id["loading-model"]["meta"]["reason"] == "downloading 40%"


async def test_chat_is_proxied_with_body_unchanged(stack: Stack) -> None:
    raw = b'{"messages":[{"role":"user","content":"hi \\u00e9"}],  "model": "fake-model", "x": 1}'
    headers = {"Content-Type": "application/json", "X-Request-Id": "req-123"}
    async with stack.client.post(
        stack.url + "/v1/chat/completions", data=raw, headers=headers
    ) as response:
        assert response.status == 200
        assert response.headers["X-Request-Id"] == "req-123"
        body = await response.json()
    assert body["choices"][0]["message"]["content"] == CHAT_REPLY
    [recorded] = stack.fake.requests
    assert recorded.path == "/v1/chat/completions"
    assert recorded.body == raw
    assert recorded.headers["X-Request-Id"] == "req-123"


async def test_request_id_is_generated_when_absent(stack: Stack) -> None:
    async with await stack.post("/v1/chat/completions", CHAT) as response:
        assert response.status == 200
        request_id = response.headers["X-Request-Id"]
    assert len(request_id) >= 16
    assert stack.fake.requests[0].headers["X-Request-Id"] == request_id


async def test_missing_model_goes_to_the_ready_default(stack: Stack) -> None:
    body = {"messages": CHAT["messages"]}
    async with await stack.post("/v1/chat/completions", body) as response:
        assert response.status == 200
    assert stack.fake.requests[0].json() == body


async def test_completions_and_embeddings_are_proxied(stack: Stack) -> None:
    async with await stack.post("/v1/completions", {"prompt": "Once upon a time"}) as response:
        assert response.status == 200
        assert (await response.json())["choices"][0]["text"] == " there was"
    async with await stack.post("/v1/embeddings", {"input": "hello"}) as response:
        assert response.status == 200
        assert (await response.json())["data"][0]["embedding"] == [0.1, 0.2, 0.3]
    assert [r.path for r in stack.fake.requests] == ["/v1/completions", "/v1/embeddings"]


async def _read_event(response: aiohttp.ClientResponse) -> str:
    """The next SSE `data:` payload."""
    async with asyncio.timeout(DEADLINE_S):
        while True:
            line = await response.content.readline()
            assert line, "the stream ended early"
            if line.startswith(b"data: "):
                return line[len(b"data: ") :].decode().strip()


async def test_stream_arrives_chunk_by_chunk(stack: Stack) -> None:
    stack.fake.hold_last_chunk = True
    async with await stack.post("/v1/chat/completions", {**CHAT, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        first = json.loads(await _read_event(response))
        assert first["choices"][0]["delta"]["content"] == "tok0 "
        # The first chunk is here while the fake still holds the last one.
        assert stack.fake.chunks_sent < stack.fake.chunks
        stack.fake.release()
        events = [await _read_event(response) for _ in range(stack.fake.chunks)]
        async with asyncio.timeout(DEADLINE_S):
            rest = await response.content.read()
    assert events[-1] == "[DONE]"
    contents = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
    assert contents == ["tok1 ", "tok2 "]
    assert rest.strip() == b""
    assert stack.fake.streams_finished == 1


async def test_completions_stream_ends_with_done(stack: Stack) -> None:
    async with await stack.post("/v1/completions", {"prompt": "x", "stream": True}) as response:
        assert response.status == 200
        async with asyncio.timeout(DEADLINE_S):
            text = (await response.read()).decode()
    assert text.endswith("data: [DONE]\n\n")
    assert text.count("data: ") == stack.fake.chunks + 1


async def test_bad_json_is_400(stack: Stack) -> None:
    async with stack.client.post(
        stack.url + "/v1/chat/completions",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    ) as response:
        assert response.status == 400
        error = _error(await response.json())
    assert error["type"] == "invalid_request_error"
    assert "not valid JSON" in str(error["message"])
    assert stack.fake.requests == []


async def test_missing_messages_is_400_with_param(stack: Stack) -> None:
    async with await stack.post("/v1/chat/completions", {"model": MODEL_ID}) as response:
        assert response.status == 400
        error = _error(await response.json())
    assert error["param"] == "messages"
    assert error["code"] == "invalid_request"
    assert stack.fake.requests == []


async def test_unknown_model_is_404_listing_available(stack: Stack) -> None:
    async with await stack.post("/v1/chat/completions", {**CHAT, "model": "mistral"}) as response:
        assert response.status == 404
        error = _error(await response.json())
    assert error["code"] == "model_not_found"
    assert MODEL_ID in str(error["message"])
    assert "loading-model" in str(error["message"])


async def test_loading_model_is_503_with_retry_after(stack: Stack) -> None:
    async with await stack.post("/v1/chat/completions", {**CHAT, "model": "loading-model"}) as r:
        assert r.status == 503
        assert r.headers["Retry-After"] == str(CONFIG.retry_after_s)
        error = _error(await r.json())
    assert error["type"] == "service_unavailable"
    assert "downloading 40%" in str(error["message"])


async def test_body_over_limit_is_400(stack: Stack) -> None:
    big = {**CHAT, "padding": "x" * CONFIG.max_body_bytes}
    async with await stack.post("/v1/chat/completions", big) as response:
        assert response.status == 400
        error = _error(await response.json())
    assert error["code"] == "body_too_large"
    assert stack.fake.requests == []


async def test_upstream_down_is_502(stack: Stack) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    stack.directory.statuses = [
        ModelStatus(ModelName("gone"), ModelState.READY, endpoint=f"http://127.0.0.1:{closed_port}")
    ]
    async with await stack.post("/v1/chat/completions", {**CHAT, "model": "gone"}) as response:
        assert response.status == 502
        error = _error(await response.json())
    assert error["code"] == "upstream_failed"
    assert "gone" in str(error["message"])


async def test_client_disconnect_cancels_the_upstream_stream(stack: Stack) -> None:
    stack.fake.hold_last_chunk = True
    response = await stack.post("/v1/chat/completions", {**CHAT, "stream": True})
    try:
        assert response.status == 200
        assert json.loads(await _read_event(response))["choices"][0]["delta"]["content"] == "tok0 "
    finally:
        response.close()  # drops the connection mid-stream
    await wait_until(lambda: stack.fake.cancelled == 1, "the fake to see the cancellation")
    assert stack.fake.streams_finished == 0


async def test_healthz(stack: Stack) -> None:
    async with stack.client.get(stack.url + "/healthz") as response:
        assert response.status == 200
        assert (await response.json()) == {"status": "ok"}


async def test_readyz_503_until_a_model_is_ready(stack: Stack) -> None:
    stack.directory.statuses = [LOADING]
    async with stack.client.get(stack.url + "/readyz") as response:
        assert response.status == 503
        assert response.headers["Retry-After"] == str(CONFIG.retry_after_s)
        error = _error(await response.json())
    assert "loading-model: downloading 40%" in str(error["message"])
    stack.directory.statuses = [LOADING, stack.ready()]
    async with stack.client.get(stack.url + "/readyz") as response:
        assert response.status == 200
        assert (await response.json()) == {"status": "ready", "models": [MODEL_ID]}


async def test_unknown_path_is_404_json(stack: Stack) -> None:
    async with stack.client.get(stack.url + "/v1/nothing-here") as response:
        assert response.status == 404
        error = _error(await response.json())
    assert error["type"] == "invalid_request_error"


async def test_wrong_method_is_405_json(stack: Stack) -> None:
    async with stack.client.get(stack.url + "/v1/chat/completions") as response:
        assert response.status == 405
        _error(await response.json())


async def test_fake_health_flips(stack: Stack) -> None:
    stack.fake.healthy = False
    async with stack.client.get(stack.fake_url + "/health") as response:
        assert response.status == 503
    stack.fake.healthy = True
    async with stack.client.get(stack.fake_url + "/health") as response:
        assert response.status == 200


async def test_official_openai_client(stack: Stack) -> None:
    async with AsyncOpenAI(base_url=stack.url + "/v1", api_key="x", max_retries=0) as client:
        completion = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}]
        )
        assert completion.choices[0].message.content == CHAT_REPLY

        stream = await client.chat.completions.create(
            model=MODEL_ID, messages=[{"role": "user", "content": "hi"}], stream=True
        )
        pieces = [chunk.choices[0].delta.content async for chunk in stream]
    assert "".join(p or "" for p in pieces) == "tok0 tok1 tok2 "
    assert [r.json()["stream"] for r in stack.fake.requests[1:]] == [True]  # type: ignore[index]
