"""Every routed endpoint over a fake llama-server: routing, validation, capabilities, the
Anthropic dialect (error shape, x-api-key, streaming), and KV-cache prefix affinity.

The API (`create_app`) runs on 127.0.0.1 with an ephemeral port in front of one or two fake
llama-servers: a local backend, and a "remote" replica reached through a `MeshAccess` whose
lane answers from a second fake (the real lane and QUIC transports are covered by
test_http_lane / test_http_tunnel; one test here crosses the real fast lane too).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any

import aiohttp
import pytest

from mesh_llm.api.app import create_app
from mesh_llm.api.openai import ENDPOINTS, PROXIED_PATHS
from mesh_llm.config import ApiConfig
from mesh_llm.core.capabilities import Capability
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.wire.messages import HttpRequestHead
from tests.fakes.fake_llama import MODEL_ID, FakeLlama, serve
from tests.fakes.waiting import wait_until
from tests.integration.test_http_lane import Lane, lane  # noqa: F401  (fixture)
from tests.integration.test_http_tunnel import Directory

DEADLINE_S = 10.0
CONFIG = ApiConfig(port=0, first_byte_timeout_s=10.0, idle_chunk_timeout_s=10.0)
GENERATIVE = (Capability.CHAT, Capability.COMPLETION)
EMBEDDER = "embed-model"
REMOTE = "node-remote-replica"
MESSAGES = [{"role": "user", "content": "hi"}]
BODIES: dict[str, dict[str, object]] = {
    "/v1/chat/completions": {"messages": MESSAGES},
    "/v1/completions": {"prompt": "Once"},
    "/v1/embeddings": {"input": "hello"},
    "/v1/responses": {"input": "hello"},
    "/v1/responses/input_tokens": {"input": "hello"},
    "/v1/rerank": {"query": "q", "documents": ["a"]},
    "/v1/messages": {"messages": MESSAGES, "max_tokens": 4},
    "/v1/messages/count_tokens": {"messages": MESSAGES},
    "/tokenize": {"content": "hello"},
    "/detokenize": {"tokens": [1]},
    "/apply-template": {"messages": MESSAGES},
    "/infill": {"input_prefix": "a", "input_suffix": "b"},
}
ALL = tuple(Capability)


class AioRemote:
    """A `RemoteResponse` read from an aiohttp response (the "remote" fake's answer)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.headers = {k: response.headers[k] for k in ("Content-Type",) if k in response.headers}

    async def chunks(self, idle_timeout_s: float) -> AsyncIterator[bytes]:
        async for chunk in self._response.content.iter_any():
            yield chunk

    def abort(self) -> None:
        self._response.close()

    def finish(self) -> None:
        self._response.close()


class FakeMesh:
    """A `MeshAccess` whose every remote node is the second fake llama-server."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self._url = url
        self.sent: list[str] = []

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> AioRemote:
        self.sent.append(head.path)
        response = await self._session.post(self._url + head.path, data=body)
        return AioRemote(response)

    def report_failure(self, node_id: str, reason: str) -> None:
        return None

    def count_request(self, model: str) -> None:
        return None

    async def drop(self, model: str) -> tuple[int, dict[str, Any]]:
        return 404, {}


@dataclass
class Api:
    local: FakeLlama
    remote: FakeLlama
    local_url: str
    directory: Directory
    url: str
    session: aiohttp.ClientSession

    async def post(
        self, path: str, body: object, headers: dict[str, str] | None = None
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        async with self.session.post(self.url + path, json=body, headers=headers) as response:
            text = await response.text()
            document = json.loads(text) if text else None
            return response.status, document, response

    def models(self, *statuses: ModelStatus) -> None:
        self.directory.statuses = list(statuses)


async def _api(stack: AsyncExitStack, config: ApiConfig) -> Api:
    local, remote = FakeLlama(healthy=True), FakeLlama(healthy=True)
    local_url = await stack.enter_async_context(serve(local.app()))
    remote_url = await stack.enter_async_context(serve(remote.app()))
    session = await stack.enter_async_context(aiohttp.ClientSession())
    mesh = FakeMesh(session, remote_url)
    directory = Directory([])
    url = await stack.enter_async_context(serve(create_app(directory, config, mesh=mesh)))
    api = Api(local, remote, local_url, directory, url, session)
    api.models(_local(api, MODEL_ID, ALL))
    return api


def _local(api: Api, name: str, capabilities: Sequence[Capability]) -> ModelStatus:
    return ModelStatus(
        ModelName(name),
        ModelState.READY,
        endpoint=api.local_url,
        capabilities=tuple(capabilities),
    )


def _remote(name: str, capabilities: Sequence[Capability]) -> ModelStatus:
    return ModelStatus(
        ModelName(name), ModelState.READY, remote=(REMOTE,), capabilities=tuple(capabilities)
    )


@pytest.fixture
async def api() -> AsyncIterator[Api]:
    async with AsyncExitStack() as stack:
        yield await _api(stack, CONFIG)


def _anthropic_error(document: object, error_type: str) -> str:
    assert isinstance(document, dict)
    assert document["type"] == "error", document
    assert set(document) == {"type", "error"}
    assert document["error"]["type"] == error_type
    message = document["error"]["message"]
    assert isinstance(message, str) and message
    return message


@pytest.mark.parametrize("path", PROXIED_PATHS)
async def test_every_path_reaches_the_local_backend_unchanged(api: Api, path: str) -> None:
    body = {**BODIES[path], "model": MODEL_ID}
    status, _document, response = await api.post(path, body, {"X-Request-Id": "r-1"})
    assert status == 200
    assert response.headers["X-Request-Id"] == "r-1"
    [recorded] = api.local.requests
    assert (recorded.path, recorded.json()) == (path, body)


@pytest.mark.parametrize("path", PROXIED_PATHS)
async def test_every_path_reaches_a_remote_host(api: Api, path: str) -> None:
    api.models(_local(api, MODEL_ID, ALL), _remote("far-model", ALL))
    status, _document, _response = await api.post(path, {**BODIES[path], "model": "far-model"})
    assert status == 200
    assert [r.path for r in api.remote.requests] == [path]
    assert api.local.requests == []


@pytest.mark.parametrize("path", ["/tokenize", "/apply-template", "/infill"])
async def test_llama_paths_without_a_model_use_the_default(api: Api, path: str) -> None:
    api.models(_remote("far-model", ALL), _remote("other", ALL))
    status, _document, _response = await api.post(path, BODIES[path])
    assert status == 200
    assert [r.path for r in api.remote.requests] == [path]


@pytest.mark.parametrize("path", sorted(p for p in PROXIED_PATHS if ENDPOINTS[p].required))
async def test_every_path_validates_its_fields(api: Api, path: str) -> None:
    status, document, _response = await api.post(path, {"model": MODEL_ID})
    assert status == 400
    if path.startswith("/v1/messages"):
        assert "'messages' is required" in _anthropic_error(document, "invalid_request_error")
    else:
        assert document["error"]["param"] == ENDPOINTS[path].required[0][0]
    assert api.local.requests == []


async def test_models_lists_capabilities(api: Api) -> None:
    api.models(
        _local(api, MODEL_ID, GENERATIVE),
        _remote(EMBEDDER, (Capability.EMBEDDINGS,)),
    )
    async with api.session.get(api.url + "/v1/models") as response:
        body = await response.json()
    by_id = {m["id"]: m for m in body["data"]}
    assert by_id[MODEL_ID]["capabilities"] == ["chat", "completion"]
    assert by_id[EMBEDDER]["capabilities"] == ["embeddings"]
    assert {m["object"] for m in body["data"]} == {"model"}


async def test_embeddings_to_a_chat_model_is_400_naming_embedders(api: Api) -> None:
    api.models(_local(api, MODEL_ID, GENERATIVE), _remote(EMBEDDER, (Capability.EMBEDDINGS,)))
    status, document, _response = await api.post(
        "/v1/embeddings", {"model": MODEL_ID, "input": "x"}
    )
    assert status == 400
    assert f"models that can: {EMBEDDER}" in document["error"]["message"]
    assert document["error"]["code"] == "model_not_embeddings_capable"
    # Without a model the request goes to the one that can.
    status, _document, _response = await api.post("/v1/embeddings", {"input": "x"})
    assert status == 200
    assert [r.path for r in api.remote.requests] == ["/v1/embeddings"]


async def test_rerank_without_a_reranker_is_a_clear_400(api: Api) -> None:
    api.models(_local(api, MODEL_ID, GENERATIVE))
    status, document, _response = await api.post("/v1/rerank", BODIES["/v1/rerank"])
    assert status == 400
    assert "no model of this mesh can" in document["error"]["message"]
    assert api.local.requests == []


async def test_anthropic_stream_is_relayed_event_by_event(api: Api) -> None:
    body = {"model": MODEL_ID, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    async with api.session.post(api.url + "/v1/messages", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    names = [line.split(": ", 1)[1] for line in text.splitlines() if line.startswith("event: ")]
    assert names == ["message_start", *["content_block_delta"] * 3, "message_stop"]


@pytest.mark.parametrize(
    ("status", "error_type"),
    [(400, "invalid_request_error"), (429, "rate_limit_error"), (500, "api_error")],
)
async def test_backend_errors_on_anthropic_paths_are_reshaped(
    api: Api, status: int, error_type: str
) -> None:
    api.local.fail_paths["/v1/messages"] = status
    got, document, _response = await api.post("/v1/messages", BODIES["/v1/messages"])
    assert got == status
    assert "fake failure" in _anthropic_error(document, error_type)


async def test_anthropic_404_and_503(api: Api) -> None:
    body = {**BODIES["/v1/messages"], "model": "no-such-model"}
    status, document, _response = await api.post("/v1/messages", body)
    assert status == 404
    assert "no-such-model" in _anthropic_error(document, "not_found_error")
    api.models(ModelStatus(ModelName(MODEL_ID), ModelState.LOADING, "downloading"))
    status, document, response = await api.post("/v1/messages/count_tokens", BODIES["/v1/messages"])
    assert status == 503
    assert response.headers["Retry-After"] == str(CONFIG.retry_after_s)
    assert "downloading" in _anthropic_error(document, "overloaded_error")


async def test_anthropic_502_when_the_backend_is_down(api: Api) -> None:
    api.models(
        ModelStatus(
            ModelName(MODEL_ID), ModelState.READY, endpoint="http://127.0.0.1:9", capabilities=ALL
        )
    )
    status, document, _response = await api.post("/v1/messages", BODIES["/v1/messages"])
    assert status == 502
    _anthropic_error(document, "api_error")


async def test_anthropic_429_when_the_queue_is_full() -> None:
    async with AsyncExitStack() as stack:
        api = await _api(stack, replace(CONFIG, queue_depth=1))
        api.local.hold_last_chunk = True
        stack.callback(api.local.release)
        chat = {"model": MODEL_ID, "messages": MESSAGES, "stream": True}
        held = await api.session.post(api.url + "/v1/chat/completions", json=chat)
        stack.callback(held.close)
        status, document, _response = await api.post("/v1/messages", BODIES["/v1/messages"])
        assert status == 429
        assert "queue" in _anthropic_error(document, "rate_limit_error")


async def test_api_key_as_bearer_or_x_api_key_and_anthropic_401() -> None:
    async with AsyncExitStack() as stack:
        api = await _api(stack, replace(CONFIG, api_key="sekret"))
        messages = BODIES["/v1/messages"]
        status, document, _response = await api.post("/v1/messages", messages)
        assert status == 401
        assert "x-api-key" in _anthropic_error(document, "authentication_error")
        status, document, _response = await api.post(
            "/v1/messages", messages, {"x-api-key": "wrong"}
        )
        assert (status, document["error"]["type"]) == (401, "authentication_error")
        status, document, _response = await api.post(
            "/v1/chat/completions", BODIES["/v1/chat/completions"]
        )
        assert (status, document["error"]["code"]) == (401, "invalid_api_key")  # OpenAI shape
        for headers in ({"x-api-key": "sekret"}, {"Authorization": "Bearer sekret"}):
            status, _document, _response = await api.post("/v1/messages", messages, headers)
            assert status == 200, headers
            status, _document, _response = await api.post(
                "/v1/chat/completions", BODIES["/v1/chat/completions"], headers
            )
            assert status == 200, headers


# -- KV-cache affinity --------------------------------------------------------------------

SYSTEM = {"role": "system", "content": "You follow the house rules below. " * 60}


def _turn(text: str) -> dict[str, object]:
    return {"model": MODEL_ID, "messages": [SYSTEM, {"role": "user", "content": text}]}


async def _prefix_followed(config: ApiConfig) -> tuple[list[str], list[str]]:
    """A request held on the local replica sends the next one (same prefix) to the remote
    one; then, with everything idle, a third request with that prefix is sent. Returns the
    user turns each fake saw (local, remote)."""
    async with AsyncExitStack() as stack:
        api = await _api(stack, config)
        api.models(
            ModelStatus(
                ModelName(MODEL_ID),
                ModelState.READY,
                endpoint=api.local_url,
                remote=(REMOTE,),
                capabilities=ALL,
            )
        )
        api.local.hold_last_chunk = True
        stream = {**_turn("first"), "stream": True}
        held = await api.session.post(api.url + "/v1/chat/completions", json=stream)
        try:
            await wait_until(
                lambda: api.local.chunks_sent > 0, "the held stream started", DEADLINE_S
            )
            status, _document, _response = await api.post("/v1/chat/completions", _turn("x"))
            assert status == 200
        finally:
            api.local.release()
            await held.read()
            held.close()
        status, _document, _response = await api.post("/v1/chat/completions", _turn("third"))
        assert status == 200
        contents = [r.json()["messages"][1]["content"] for r in api.local.requests]  # type: ignore[index]
        remote = [r.json()["messages"][1]["content"] for r in api.remote.requests]  # type: ignore[index]
        return contents, remote


async def test_a_shared_prefix_follows_the_replica_that_served_it() -> None:
    local, remote = await _prefix_followed(CONFIG)
    # "x" was recorded on the remote replica while the local one was busy; "third" shares
    # the system prompt, whose latest holder is the remote replica: it goes there although
    # the idle local backend would win a tie.
    assert (local, remote) == (["first"], ["x", "third"])


async def test_without_affinity_idle_ties_go_local() -> None:
    local, remote = await _prefix_followed(replace(CONFIG, prefix_affinity=False))
    assert (local, remote) == (["first", "third"], ["x"])


async def test_new_paths_cross_the_real_fast_lane(lane: Lane) -> None:  # noqa: F811
    lane.fake.release()
    for path in ("/v1/messages", "/tokenize", "/v1/responses"):
        body = {**BODIES[path], "model": "lane-model"}
        async with lane.session.post(lane.base + path, json=body) as response:
            assert response.status == 200, await response.text()
            assert (await response.json())["path"] == path
    assert [r.path for r in lane.fake.requests] == ["/v1/messages", "/tokenize", "/v1/responses"]
