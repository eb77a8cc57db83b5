"""The API pool returns to the fast lane once the transport may dial it again.

A host runs a real `FastLaneServer` that refuses the requester at first (a firewall stand-in),
so a real `PeerTransport` falls back to QUIC — an in-memory QUIC stream here, answered by the
host's real `serve_http` — and remembers the failure for `fast_lane_retry_s` on a fake clock.
Checked: during that time the pooled QUIC stream is reused (the lane is not re-dialled); once
the memory expires and the host admits the lane, the next request goes over the fast lane (the
pooled QUIC stream is let go) and later ones reuse that one fast-lane connection.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from dataclasses import replace
from typing import cast

from mesh_llm.errors import StreamReset
from mesh_llm.identity import NodeIdentity
from mesh_llm.net.fastlane import FastLaneServer
from mesh_llm.net.http_peer import HttpPeerClient, ResponseWriter, serve_http
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.net.streams import ByteStream, QuicByteStream, TcpByteStream
from mesh_llm.net.transport import PeerTransport
from mesh_llm.wire.messages import HttpRequestHead, NodeRecord, RefuseCode, StreamType
from tests.fakes.waiting import running

RETRY_S = 60.0
TIMEOUT_S = 10.0
HEAD = HttpRequestHead("POST", "/v1/chat/completions", {"X-Request-Id": "pool"})


class MemoryEnd:
    """One end of an in-memory stream pair, with the methods `QuicByteStream` uses."""

    def __init__(self) -> None:
        self.peer: MemoryEnd | None = None
        self._buffer = bytearray()
        self._eof = False
        self._failed = False
        self._changed = asyncio.Event()
        self.ended_by_us = False

    async def read(self, max_bytes: int) -> bytes:
        while not self._buffer and not self._eof:
            if self._failed:
                raise StreamReset("reset")
            self._changed.clear()
            await self._changed.wait()
        if self._failed:
            raise StreamReset("reset")
        data = bytes(self._buffer[:max_bytes])
        del self._buffer[:max_bytes]
        return data

    async def read_exactly(self, count: int) -> bytes:
        data = b""
        while len(data) < count:
            more = await self.read(count - len(data))
            if not more:
                raise StreamReset(f"stream ended after {len(data)} of {count} bytes")
            data += more
        return data

    def write(self, data: bytes) -> None:
        if self.ended_by_us or self._failed or self.peer is None:
            raise StreamReset("closed")
        self.peer._buffer += data
        self.peer._changed.set()

    async def wait_writable(self, limit: int) -> None:
        return None

    def is_usable(self) -> bool:
        return not (self.ended_by_us or self._failed or self._eof)

    def write_eof(self) -> None:
        self.ended_by_us = True
        if self.peer is not None:
            self.peer._eof = True
            self.peer._changed.set()

    def reset(self, code: RefuseCode) -> None:
        for end in (self, self.peer):
            if end is not None:
                end._failed = True
                end._changed.set()


async def answer(writer: ResponseWriter, head: HttpRequestHead, body: bytes) -> None:
    writer.head(200, {"X-Request-Id": head.headers.get("X-Request-Id", "")})
    await writer.body(b"ok:" + body)
    writer.end()


class FakeQuic:
    """The requester's admitted QUIC connection: each stream is answered by `serve_http`."""

    is_closed = False
    remote_addr = None

    def __init__(self, host: NodeIdentity, group: asyncio.TaskGroup) -> None:
        self._host = host
        self._group = group
        self.opened: list[MemoryEnd] = []

    async def open_stream(self, stream_type: StreamType) -> QuicStream:
        ours, theirs = MemoryEnd(), MemoryEnd()
        ours.peer, theirs.peer = theirs, ours
        self.opened.append(ours)
        host_side = QuicByteStream(cast(QuicStream, theirs))
        self._group.create_task(
            serve_http(host_side, self._host.node_id, answer, max_body_bytes=1 << 20, idle_s=30.0)
        )
        return cast(QuicStream, ours)


class Links:
    def __init__(self, record: NodeRecord, quic: FakeQuic) -> None:
        self.record = record
        self.quic = quic

    def connection_of(self, node_id: str) -> QuicPeerConnection | None:
        return None  # the fast lane is dialled at the record's first address

    async def connection_for(self, node_id: str) -> QuicPeerConnection:
        return cast(QuicPeerConnection, self.quic)

    def record_of(self, node_id: str) -> NodeRecord | None:
        return self.record if node_id == self.record.node_id else None


async def exchange(client: HttpPeerClient, peer: str, body: bytes) -> tuple[str, bytes]:
    head = replace(HEAD, body_len=len(body))
    response = await client.request(peer, head, body, TIMEOUT_S)  # type: ignore[arg-type]
    assert response.status == 200
    chunks = [chunk async for chunk in response.chunks(TIMEOUT_S)]
    return response.lane, b"".join(chunks)


async def test_the_pool_returns_to_the_fast_lane_once_the_retry_time_passed() -> None:
    host, requester = NodeIdentity.generate(), NodeIdentity.generate()
    admitted = False
    fast_connections: list[str] = []
    now = [1000.0]

    async def on_connection(
        peer: str,
        purpose: StreamType,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        fast_connections.append(peer)
        stream: ByteStream = TcpByteStream(reader, writer)
        await serve_http(stream, host.node_id, answer, max_body_bytes=1 << 20, idle_s=30.0)

    async with AsyncExitStack() as stack:
        group = await stack.enter_async_context(asyncio.TaskGroup())
        server = await FastLaneServer.start(
            host,
            host="127.0.0.1",
            on_connection=on_connection,
            is_allowed=lambda node: admitted and node == requester.node_id,
            purposes=frozenset({StreamType.HTTP}),
        )
        await stack.enter_async_context(running(server.run()))
        quic = FakeQuic(host, group)
        record = NodeRecord(host.node_id, 1, addrs=("127.0.0.1:9",), fast_lane_port=server.port)
        transport = PeerTransport(
            requester,
            Links(record, quic),
            fast_lane_purposes=frozenset({StreamType.HTTP}),
            connect_timeout_s=TIMEOUT_S,
            fast_lane_retry_s=RETRY_S,
            clock=lambda: now[0],
        )
        client = HttpPeerClient(transport, pool_idle_s=1e9, pool_max_idle=16, finish_s=2.0)
        await stack.enter_async_context(running(client.run()))
        peer = host.node_id

        # Blocked: the first request falls back to QUIC; the next ones reuse that stream.
        assert await exchange(client, peer, b"1") == ("quic", b"ok:1")
        assert transport.on_quic_for_now() == [peer]
        now[0] += RETRY_S / 2
        assert await exchange(client, peer, b"2") == ("quic", b"ok:2")
        assert len(quic.opened) == 1 and fast_connections == []

        # The block is lifted and the failure memory expires: back on the fast lane.
        admitted = True
        now[0] += RETRY_S
        assert transport.fast_lane_eligible(peer, StreamType.HTTP)
        assert await exchange(client, peer, b"3") == ("fast", b"ok:3")
        assert quic.opened[0].ended_by_us  # the pooled QUIC stream was let go
        for body in (b"4", b"5"):
            assert await exchange(client, peer, body) == ("fast", b"ok:" + body)
        assert len(quic.opened) == 1 and fast_connections == [requester.node_id]
        assert client.sent == {"fast": 3, "quic": 2, "relay": 0}
        assert transport.on_quic_for_now() == []
