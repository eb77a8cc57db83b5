"""API requests over the fast lane (TCP + TLS), on loopback with real sockets.

A host runs a real `FastLaneServer` whose HTTP connections go to `InboundRequests.serve`
(answering from a fake llama-server); a requester's API (`create_app`) sends requests for the
host's model through a real `HttpPeerClient` over a real `PeerTransport`. Checked: answers and
streams cross the lane chunk by chunk on one reused connection; a client that goes away cancels
the host's request; a pooled connection the host closed is replaced transparently; a host
without a lane (or that refuses us) is reached over QUIC instead; garbage on a lane connection
closes only that connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from typing import Any, cast

import aiohttp
import pytest

from mesh_llm.api.admission import LocalAdmission
from mesh_llm.api.app import create_app
from mesh_llm.api.inbound import InboundRequests
from mesh_llm.api.metrics import ApiMetrics, MetricSources
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName, NodeId
from mesh_llm.identity import NodeIdentity
from mesh_llm.net.fastlane import FastLaneServer, fast_lane_connect
from mesh_llm.net.http_peer import HttpPeerClient, PeerResponse
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.net.streams import TcpByteStream
from mesh_llm.net.transport import PeerTransport
from mesh_llm.wire.messages import HttpRequestHead, NodeRecord, StreamType
from tests.fakes.fake_llama import CHAT_REPLY, FakeLlama, serve
from tests.fakes.waiting import running, wait_until
from tests.integration.test_http_tunnel import Directory

MODEL = "lane-model"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
CONFIG = ApiConfig(port=0, first_byte_timeout_s=10.0, idle_chunk_timeout_s=10.0)
TIMEOUT_S = 10.0


class FakeQuic:
    """Stands for the requester's admitted QUIC connection to the host: asked for first (a
    client's QUIC admission), used only when the fast lane cannot carry a request."""

    is_closed = False
    remote_addr = None

    def __init__(self) -> None:
        self.opened: list[StreamType] = []

    async def open_stream(self, stream_type: StreamType) -> QuicStream:
        self.opened.append(stream_type)
        return cast(QuicStream, object())


class Links:
    """The requester's view of the host: its record (fast-lane port) and a QUIC stand-in."""

    def __init__(self, host: NodeId, fast_lane_port: int) -> None:
        self.record = NodeRecord(host, 1, addrs=("127.0.0.1:9",), fast_lane_port=fast_lane_port)
        self.quic = FakeQuic()

    def connection_of(self, node_id: NodeId) -> QuicPeerConnection | None:
        return None  # where the fast lane is dialled: the record's first address

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        return cast(QuicPeerConnection, self.quic)

    def record_of(self, node_id: NodeId) -> NodeRecord | None:
        return self.record if node_id == self.record.node_id else None


def transport(identity: NodeIdentity, links: Links) -> PeerTransport:
    return PeerTransport(
        identity,
        links,
        fast_lane_purposes=frozenset({StreamType.HTTP}),
        connect_timeout_s=TIMEOUT_S,
        fast_lane_retry_s=60.0,
    )


class LaneAccess:
    """The requester's MeshAccess: the fast lane through a real pool."""

    def __init__(self, client: HttpPeerClient) -> None:
        self.client = client
        self.failures: list[str] = []

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> PeerResponse:
        return await self.client.request(NodeId(node_id), head, body, first_byte_timeout_s)

    def report_failure(self, node_id: str, reason: str) -> None:
        self.failures.append(node_id)

    def count_request(self, model: str) -> None:
        return None

    async def drop(self, model: str) -> tuple[int, dict[str, Any]]:
        return 404, {}


@dataclass
class Lane:
    host: NodeIdentity
    fake: FakeLlama
    lanes: HttpPeerClient
    access: LaneAccess
    base: str
    session: aiohttp.ClientSession
    connections: list[NodeId]  # one entry per lane connection the host accepted
    host_metrics: ApiMetrics
    inbound: InboundRequests
    port: int  # of the host's fast lane
    requester: NodeIdentity


@pytest.fixture
async def lane() -> AsyncIterator[Lane]:
    host, requester = NodeIdentity.generate(), NodeIdentity.generate()
    fake = FakeLlama(healthy=True, chunks=4, hold_last_chunk=True)
    connections: list[NodeId] = []
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        backend = await stack.enter_async_context(serve(fake.app()))
        host_directory = Directory(
            [ModelStatus(ModelName(MODEL), ModelState.READY, endpoint=backend)]
        )
        host_metrics = ApiMetrics(MetricSources())
        inbound = InboundRequests(
            host_directory,
            session,
            CONFIG,
            LocalAdmission(CONFIG.queue_depth),
            host_metrics,
        )

        async def on_connection(
            peer: NodeId,
            purpose: StreamType,
            reader: asyncio.StreamReader,
            writer: asyncio.StreamWriter,
        ) -> None:
            connections.append(peer)
            await inbound.serve(TcpByteStream(reader, writer), peer)

        server = await FastLaneServer.start(
            host,
            host="127.0.0.1",
            on_connection=on_connection,
            is_allowed=lambda node: node == requester.node_id,
            purposes=frozenset({StreamType.HTTP}),
        )
        await stack.enter_async_context(running(server.run()))
        lanes = HttpPeerClient(
            transport(requester, Links(host.node_id, server.port)),
            pool_idle_s=20.0,
            pool_max_idle=16,
            finish_s=2.0,
        )
        await stack.enter_async_context(running(lanes.run()))
        access = LaneAccess(lanes)
        directory = Directory(
            [ModelStatus(ModelName(MODEL), ModelState.LOADING, remote=(host.node_id,))]
        )
        base = await stack.enter_async_context(serve(create_app(directory, CONFIG, mesh=access)))
        yield Lane(
            host,
            fake,
            lanes,
            access,
            base,
            session,
            connections,
            host_metrics,
            inbound,
            server.port,
            requester,
        )


async def test_requests_cross_the_lane_on_one_reused_connection(lane: Lane) -> None:
    headers = {"X-Request-Id": "lane-1"}
    lane.fake.release()  # nothing held: plain answers
    for _ in range(3):
        async with lane.session.post(
            lane.base + "/v1/chat/completions", json=CHAT, headers=headers
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert resp.headers["X-Request-Id"] == "lane-1"
            assert (await resp.json())["choices"][0]["message"]["content"] == CHAT_REPLY
    assert lane.fake.requests[-1].headers["X-Request-Id"] == "lane-1"
    assert lane.lanes.sent == {"fast": 3, "quic": 0, "relay": 0}
    assert len(lane.connections) == 1  # the pool reused the one connection


async def test_a_stream_arrives_chunk_by_chunk(lane: Lane) -> None:
    stream = {**CHAT, "stream": True}
    async with lane.session.post(lane.base + "/v1/chat/completions", json=stream) as resp:
        assert resp.status == 200
        seen = b""
        while seen.count(b"data: ") < 3:  # three chunks arrive while the last one is held
            seen += await asyncio.wait_for(resp.content.readany(), TIMEOUT_S)
        assert b"[DONE]" not in seen
        lane.fake.release()
        seen += await resp.content.read()
    assert seen.endswith(b"data: [DONE]\n\n")
    assert lane.fake.streams_finished == 1
    # The connection went back to the pool after the end marker: the next request reuses it.
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    assert len(lane.connections) == 1


async def test_client_disconnect_cancels_the_request_on_the_host(lane: Lane) -> None:
    resp = await lane.session.post(
        lane.base + "/v1/chat/completions", json={**CHAT, "stream": True}
    )
    seen = b""
    while seen.count(b"data: ") < 2:
        seen += await asyncio.wait_for(resp.content.readany(), TIMEOUT_S)
    resp.close()  # the API client goes away mid-stream
    await wait_until(lambda: lane.fake.cancelled == 1, "the host's upstream request cancelled")
    assert lane.fake.streams_finished == 0
    lane.fake.release()
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200  # a fresh connection: the aborted one was closed
    assert len(lane.connections) == 2


async def test_a_client_that_stops_at_done_is_a_complete_request(lane: Lane) -> None:
    """SSE clients (the openai SDK) close once `[DONE]` arrived, maybe before the host's end
    marker: the request counts as answered on both sides and the connection is kept."""
    lane.fake.release()
    lane.fake.linger_after_done_s = 0.3  # the end of the response comes after [DONE]
    resp = await lane.session.post(
        lane.base + "/v1/chat/completions", json={**CHAT, "stream": True}
    )
    seen = b""
    while b"data: [DONE]" not in seen:
        seen += await asyncio.wait_for(resp.content.readany(), TIMEOUT_S)
    resp.close()  # like an SSE client: it has the whole answer
    await wait_until(lambda: lane.fake.streams_finished == 1, "the host's stream to end normally")
    assert lane.fake.cancelled == 0
    await wait_until(
        lambda: lane.host_metrics.peer_requests.labels(MODEL, "200")._value.get() == 1,
        "200 on the host",
    )
    metrics = await (await lane.session.get(lane.base + "/metrics")).text()
    assert f'mesh_llm_requests_total{{model="{MODEL}",route="remote",status="200"}} 1.0' in metrics
    lane.fake.linger_after_done_s = 0
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as again:
        assert again.status == 200
    assert len(lane.connections) == 1  # the connection went back to the pool


async def test_a_pooled_connection_the_host_closed_is_replaced(
    lane: Lane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lane.inbound, "_config", replace(CONFIG, peer_stream_idle_s=0.2))
    lane.fake.release()
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
    await asyncio.sleep(0.5)  # the host closes the idle connection
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200, await resp.text()
    assert len(lane.connections) == 2
    assert lane.access.failures == []


async def test_garbage_closes_only_that_connection(lane: Lane) -> None:
    reader, writer, _ = await fast_lane_connect(
        lane.requester,
        "127.0.0.1",
        lane.port,
        lane.host.node_id,
        TIMEOUT_S,
        StreamType.HTTP,
    )
    writer.write(b"\xff\xff\xff\xff" + b"junk")
    assert await asyncio.wait_for(reader.read(), TIMEOUT_S) == b""  # the host hung up
    writer.close()
    lane.fake.release()
    async with lane.session.post(lane.base + "/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200


async def test_without_a_lane_the_request_goes_over_quic(lane: Lane) -> None:
    refused = Links(lane.host.node_id, lane.port)  # a node the host does not allow
    refused_transport = transport(NodeIdentity.generate(), refused)
    stream = await refused_transport.open(lane.host.node_id, StreamType.HTTP)
    assert stream.lane == "quic" and refused.quic.opened == [StreamType.HTTP]  # not allowed
    assert refused_transport.on_quic_for_now() == [lane.host.node_id]
    assert refused_transport.reason_of(lane.host.node_id).startswith("fast lane to 127.0.0.1:")
    # Within the retry time the lane is not dialled again: QUIC, the reason kept.
    again = await refused_transport.open(lane.host.node_id, StreamType.HTTP)
    assert again.lane == "quic" and len(refused.quic.opened) == 2
    assert refused_transport.reason_of(lane.host.node_id).startswith("fast lane to 127.0.0.1:")
    no_address = Links(lane.host.node_id, 0)  # advertises no fast lane
    no_lane = transport(NodeIdentity.generate(), no_address)
    assert (await no_lane.open(lane.host.node_id, StreamType.HTTP)).lane == "quic"
    assert no_lane.reason_of(lane.host.node_id) == "the peer advertises no fast lane"
    assert no_lane.on_quic_for_now() == []
