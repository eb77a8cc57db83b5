"""API requests across the mesh, in-process: real QUIC between two or three mesh shells.

Node B's API routes a request for a model served only by host A over an `HTTP` QUIC stream;
A's `InboundRequests` answers it from a fake llama-server. Covers non-streamed and streamed
answers (chunks arrive before the stream ends), request ids, refusals relayed with
`Retry-After`, client disconnect cancelling the host's upstream request, failover to another
replica when a host fails before answering, and garbage on an HTTP stream.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack
from typing import Any

import aiohttp
import pytest

from mesh_llm.api.admission import LocalAdmission
from mesh_llm.api.app import create_app
from mesh_llm.api.inbound import InboundRequests
from mesh_llm.api.metrics import CLIENT_CLOSED_STATUS, ApiMetrics, MetricSources
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName, NodeId
from mesh_llm.errors import StreamReset
from mesh_llm.identity import new_mesh
from mesh_llm.net.http_peer import PeerResponse
from mesh_llm.net.streams import ByteStream
from mesh_llm.token import InviteToken
from mesh_llm.wire.messages import HttpRequestHead, StreamType
from tests.fakes.fake_llama import CHAT_REPLY, FakeLlama, serve
from tests.fakes.waiting import wait_until
from tests.integration.test_peers import Running

MODEL = "remote-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CONFIG = ApiConfig(port=0, first_byte_timeout_s=10.0, idle_chunk_timeout_s=10.0)


class Directory:
    def __init__(self, statuses: Sequence[ModelStatus] = ()) -> None:
        self.statuses = list(statuses)

    def model_statuses(self) -> Sequence[ModelStatus]:
        return self.statuses


class Access:
    """The MeshAccess of the requesting node, over its real PeerManager."""

    def __init__(self, node: Running) -> None:
        self.node = node
        self.failures: list[str] = []
        self.counted: list[str] = []

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> PeerResponse:
        # No fast-lane server here: QUIC streams (see test_http_lane for the fast lane).
        return await self.node.http.request(NodeId(node_id), head, body, first_byte_timeout_s)

    def report_failure(self, node_id: str, reason: str) -> None:
        self.failures.append(node_id)

    def count_request(self, model: str) -> None:
        self.counted.append(model)

    async def drop(self, model: str) -> tuple[int, dict[str, Any]]:
        return 404, {}


class Host:
    """A mesh shell serving MODEL from a fake llama-server through `InboundRequests`."""

    def __init__(self, node: Running, fake: FakeLlama) -> None:
        self.node = node
        self.fake = fake
        self.directory = Directory()
        self.admission = LocalAdmission(CONFIG.queue_depth)
        self.metrics = ApiMetrics(MetricSources())

    async def start(self, stack: AsyncExitStack, session: aiohttp.ClientSession) -> None:
        url = await stack.enter_async_context(serve(self.fake.app()))
        self.directory.statuses = [ModelStatus(ModelName(MODEL), ModelState.READY, endpoint=url)]
        inbound = InboundRequests(self.directory, session, CONFIG, self.admission, self.metrics)
        self.node.handlers.serve(StreamType.HTTP, inbound.serve)


@pytest.fixture
async def mesh() -> AsyncIterator[tuple[Running, Running, AsyncExitStack]]:
    """Host A (seed) and requester B, linked; an exit stack for more resources."""
    a = Running(new_mesh())
    token = await a.start()
    b = Running(a.peers._mesh, (token,))
    await b.start()
    async with AsyncExitStack() as stack:
        try:
            await wait_until(lambda: a.identity.node_id in b.peer_ids(), "B sees A")
            yield a, b, stack
        finally:
            await b.stop()
            await a.stop()


async def _api(
    stack: AsyncExitStack, b: Running, remotes: Sequence[str]
) -> tuple[str, Access, aiohttp.ClientSession]:
    directory = Directory(
        [ModelStatus(ModelName(MODEL), ModelState.LOADING, remote=tuple(remotes))]
    )
    access = Access(b)
    base = await stack.enter_async_context(serve(create_app(directory, CONFIG, mesh=access)))
    session = await stack.enter_async_context(aiohttp.ClientSession())
    return base, access, session


async def _remote_host(
    mesh: tuple[Running, Running, AsyncExitStack], fake: FakeLlama
) -> tuple[Host, str, Access, aiohttp.ClientSession]:
    """A serves MODEL from `fake`; B's API (base URL returned) routes to A."""
    a, b, stack = mesh
    host = Host(a, fake)
    base, access, session = await _api(stack, b, [a.identity.node_id])
    await host.start(stack, session)
    return host, base, access, session


async def test_non_streamed_and_streamed_requests_cross_one_quic_hop(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    fake = FakeLlama(healthy=True, chunks=4, hold_last_chunk=True)
    host, base, access, session = await _remote_host(mesh, fake)

    headers = {"X-Request-Id": "req-42"}
    async with session.post(base + "/v1/chat/completions", json=CHAT, headers=headers) as resp:
        assert resp.status == 200, await resp.text()
        assert resp.headers["X-Request-Id"] == "req-42"
        body = await resp.json()
    assert body["choices"][0]["message"]["content"] == CHAT_REPLY
    assert fake.requests[-1].headers["X-Request-Id"] == "req-42"
    assert json.loads(fake.requests[-1].body) == CHAT
    assert access.counted == [MODEL]

    stream = {**CHAT, "stream": True}
    async with session.post(base + "/v1/chat/completions", json=stream) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        seen = b""
        while seen.count(b"data: ") < 3:  # three chunks arrive while the last one is held
            seen += await asyncio.wait_for(resp.content.readany(), 10)
        assert b"tok2" in seen and b"[DONE]" not in seen
        fake.release()
        seen += await resp.content.read()
    assert b"tok3" in seen and seen.endswith(b"data: [DONE]\n\n")
    assert fake.streams_finished == 1
    # The host counts what it answered for other nodes.
    assert host.metrics.peer_requests.labels(MODEL, "200")._value.get() == 2


async def test_refusals_of_the_host_are_relayed_with_retry_after(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    host, base, _access, session = await _remote_host(mesh, FakeLlama(healthy=True))
    host.directory.statuses = [ModelStatus(ModelName(MODEL), ModelState.LOADING, "loading 40%")]
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 503
        assert resp.headers["Retry-After"] == str(CONFIG.retry_after_s)
        assert "loading 40%" in (await resp.json())["error"]["message"]


async def test_a_full_host_queue_is_relayed_as_429_and_frees(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    fake = FakeLlama(healthy=True)
    host, base, _access, session = await _remote_host(mesh, fake)
    held = [host.admission.try_acquire(MODEL) for _ in range(host.admission.depth)]
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"] == str(CONFIG.busy_retry_after_s)
        error = (await resp.json())["error"]
        assert error["code"] == "queue_full" and MODEL in error["message"]
    assert fake.requests == []  # refused before the backend
    for release in held:
        assert release is not None
        release()
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert host.admission.in_flight() == {}


async def test_a_full_local_queue_sends_the_request_to_a_remote_replica(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    a, b, stack = mesh
    remote_fake = FakeLlama(healthy=True)
    await Host(a, remote_fake).start(
        stack, await stack.enter_async_context(aiohttp.ClientSession())
    )
    local_fake = FakeLlama(healthy=True, chunks=2, hold_last_chunk=True)
    local_url = await stack.enter_async_context(serve(local_fake.app()))
    directory = Directory(
        [
            ModelStatus(
                ModelName(MODEL), ModelState.READY, endpoint=local_url, remote=(a.identity.node_id,)
            )
        ]
    )
    config = dataclasses.replace(CONFIG, queue_depth=1)
    base = await stack.enter_async_context(serve(create_app(directory, config, mesh=Access(b))))
    session = await stack.enter_async_context(aiohttp.ClientSession())
    # The first stream takes the local slot (local first on ties) and holds it.
    first = await session.post(base + "/v1/chat/completions", json={**CHAT, "stream": True})
    assert first.status == 200
    await asyncio.wait_for(first.content.readany(), 10)
    assert len(local_fake.requests) == 1
    # The local queue is full (depth 1): the next request goes to A instead of a 429.
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200, await resp.text()
    assert len(remote_fake.requests) == 1 and len(local_fake.requests) == 1
    local_fake.release()
    await first.read()
    first.close()
    metrics = await (await session.get(base + "/metrics")).text()
    assert f'mesh_llm_requests_total{{model="{MODEL}",route="remote",status="200"}} 1.0' in metrics
    assert f'mesh_llm_requests_total{{model="{MODEL}",route="local",status="200"}} 1.0' in metrics


async def test_client_disconnect_cancels_the_request_on_the_host(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    fake = FakeLlama(healthy=True, chunks=3, hold_last_chunk=True)
    host, base, _access, session = await _remote_host(mesh, fake)
    resp = await session.post(base + "/v1/chat/completions", json={**CHAT, "stream": True})
    seen = b""
    while seen.count(b"data: ") < 2:
        seen += await asyncio.wait_for(resp.content.readany(), 10)
    resp.close()  # the API client goes away mid-stream
    await wait_until(lambda: fake.cancelled == 1, "the host's upstream request cancelled")
    assert fake.streams_finished == 0
    closed = host.metrics.peer_requests.labels(MODEL, str(CLIENT_CLOSED_STATUS))
    await wait_until(lambda: closed._value.get() == 1, "the host counts a 499")


async def test_a_host_failing_before_its_answer_is_retried_on_a_replica(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    a, b, stack = mesh
    token = InviteToken(
        a.peers._mesh.mesh_id,
        a.peers._mesh.secret,
        a.identity.node_id,
        (f"127.0.0.1:{a.peers.port}",),
    )
    c = Running(a.peers._mesh, (token,))
    await c.start()
    stack.push_async_callback(c.stop)
    await wait_until(lambda: b.peers.is_linked(c.identity.node_id), "B linked to C", 20)
    base, access, session = await _api(stack, b, [a.identity.node_id, c.identity.node_id])
    fake_c = FakeLlama(healthy=True)
    await Host(c, fake_c).start(stack, session)

    async def broken(stream: ByteStream, peer: NodeId) -> None:
        stream.abort()  # A fails every request before answering

    a.handlers.serve(StreamType.HTTP, broken)
    for _ in range(2):  # replicas rotate: one of the two requests tries A first
        async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["choices"][0]["message"]["content"] == CHAT_REPLY
    assert access.failures == [a.identity.node_id]
    assert len(fake_c.requests) == 2

    c.handlers.serve(StreamType.HTTP, broken)
    b.http.forget(c.identity.node_id)  # B's pooled stream to C still has the old handler
    # now no replica can answer: 502 naming the failure
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 502
        error = (await resp.json())["error"]
        assert error["code"] == "upstream_failed" and "StreamReset" in error["message"]


async def test_garbage_on_an_http_stream_is_reset_and_the_host_keeps_serving(
    mesh: tuple[Running, Running, AsyncExitStack],
) -> None:
    a, b, _stack = mesh
    _host, base, _access, session = await _remote_host(mesh, FakeLlama(healthy=True))
    connection = await b.peers.connection_for(a.identity.node_id)
    for garbage in (b"\xff\xff\xff\xff", b"\x00\x00\x00\x03\xc1\xc1\xc1", b"\x00\x00"):
        stream = await connection.open_stream(StreamType.HTTP)
        stream.write(garbage, end_stream=True)
        with pytest.raises(StreamReset):
            await asyncio.wait_for(stream.read_exactly(1), 40)
    async with session.post(base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
