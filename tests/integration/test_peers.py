"""In-process mesh shells on loopback: real QUIC, real admission, the real core.

Two `PeerManager`s join through a token and see each other; an admitted peer that sends
garbage on its control stream is disconnected while the node keeps serving everyone else.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from mesh_llm.config import NetConfig
from mesh_llm.core.mesh import MeshCore, MeshTimings
from mesh_llm.identity import MeshSecret, NodeIdentity, new_mesh
from mesh_llm.net.hello import FramedChannel, admit_outbound
from mesh_llm.net.http_peer import HttpPeerClient
from mesh_llm.net.peers import PeerManager
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.net.transport import PeerTransport, StreamHandlers
from mesh_llm.token import InviteToken
from mesh_llm.wire.messages import NodeRecord, RefuseCode, StreamType
from tests.fakes.waiting import wait_until

DEADLINE_S = 10.0


class Running:
    def __init__(self, mesh: MeshSecret, tokens: tuple[InviteToken, ...] = ()) -> None:
        self.identity = NodeIdentity.generate()
        loop = asyncio.get_running_loop()
        record = NodeRecord(node_id=self.identity.node_id, version=1, name="test")
        core = MeshCore(record, MeshTimings(), random.Random(1), loop.time())
        self.handlers = StreamHandlers()  # RPC and HTTP streams of admitted peers
        self.peers = PeerManager(
            self.identity,
            mesh,
            core,
            tokens=tokens,
            timings=NetConfig(),
            inbound=self.handlers.accept,
        )
        self.transport = PeerTransport(
            self.identity,
            self.peers,
            fast_lane_purposes=frozenset(),  # no fast-lane server here: QUIC streams
            connect_timeout_s=DEADLINE_S,
            fast_lane_retry_s=60.0,
        )
        self.http = HttpPeerClient(self.transport, pool_idle_s=20.0, pool_max_idle=16, finish_s=2.0)
        self.task: asyncio.Task[None] | None = None

    async def start(self) -> InviteToken:
        port = await self.peers.bind("127.0.0.1", 0)
        self.task = asyncio.get_running_loop().create_task(self._run())
        addrs = (f"127.0.0.1:{port}",)
        self.peers.update_self(addrs=addrs)
        return InviteToken(
            self.peers._mesh.mesh_id, self.peers._mesh.secret, self.identity.node_id, addrs
        )

    async def _run(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self.peers.run())
            group.create_task(self.http.run())

    def peer_ids(self) -> set[str]:
        return {p["node_id"] for p in self.peers.snapshot()["peers"]}

    async def stop(self) -> None:
        if self.task is not None:
            await self.peers.leave()
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def seed() -> AsyncIterator[tuple[Running, InviteToken]]:
    node = Running(new_mesh())
    token = await node.start()
    try:
        yield node, token
    finally:
        await node.stop()


async def test_two_shells_join_and_see_each_other(seed: tuple[Running, InviteToken]) -> None:
    node, token = seed
    joiner = Running(node.peers._mesh, (token,))
    await joiner.start()
    try:
        await wait_until(
            lambda: (
                joiner.identity.node_id in node.peer_ids()
                and node.identity.node_id in joiner.peer_ids()
            ),
            "mutual view",
        )
    finally:
        await joiner.stop()
    await wait_until(lambda: joiner.identity.node_id not in node.peer_ids(), "clean leave")


async def test_garbage_after_admission_closes_only_that_connection(
    seed: tuple[Running, InviteToken],
) -> None:
    node, token = seed
    rogue = NodeIdentity.generate()

    async def no_streams(c: QuicPeerConnection, k: StreamType, s: QuicStream) -> None:
        s.reset(RefuseCode.UNKNOWN_STREAM)

    endpoint = await QuicEndpoint.bind(rogue, "127.0.0.1", 0, no_streams, lambda _c: None)
    try:
        port = int(token.addrs[0].rsplit(":", 1)[1])
        connection = await endpoint.dial("127.0.0.1", port, node.identity.node_id, DEADLINE_S)
        channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
        await admit_outbound(channel, rogue, node.peers._mesh, expected=node.identity.node_id)
        await wait_until(lambda: node.peers.is_linked(rogue.node_id), "rogue linked")
        channel.stream.write(b"\x00\x00\x00\x05\xc1\xc1\xc1\xc1\xc1")  # a frame of garbage
        await asyncio.wait_for(connection.wait_closed(), DEADLINE_S)
        assert "msgpack" in connection.close_reason or "frame" in connection.close_reason, (
            connection.close_reason
        )
        await wait_until(lambda: not node.peers.is_linked(rogue.node_id), "rogue dropped")
        # The node still admits and gossips with a well-behaved joiner.
        joiner = Running(node.peers._mesh, (token,))
        await joiner.start()
        try:
            await wait_until(lambda: joiner.identity.node_id in node.peer_ids(), "joiner seen")
        finally:
            await joiner.stop()
    finally:
        endpoint.close()


async def test_a_peer_whose_port_closed_without_a_word_is_dead_from_refused_probes(
    seed: tuple[Running, InviteToken], caplog: pytest.LogCaptureFixture
) -> None:
    """A `kill -9` in miniature: the joiner's UDP socket closes, nothing is sent. The node's
    packets to it come back as ICMP port unreachable; its probes decide, well before the
    silence threshold."""
    node, token = seed
    joiner = Running(node.peers._mesh, (token,))
    await joiner.start()
    gone = joiner.identity.node_id
    await wait_until(lambda: gone in node.peer_ids(), "joined")
    endpoint = joiner.peers._endpoint
    assert endpoint is not None and endpoint._transport is not None
    loop = asyncio.get_running_loop()
    transport = endpoint._transport
    with caplog.at_level("INFO"):
        # The process is gone: its port closes and it sends nothing more (no CONNECTION_CLOSE,
        # no Leaving, not even when its tasks end below).
        transport.sendto = lambda data, addr=None: None  # type: ignore[method-assign]
        transport.abort()
        closed = loop.time()
        await wait_until(lambda: gone not in node.peer_ids(), "refused probes make it dead")
        detected_s = loop.time() - closed
    assert joiner.task is not None
    joiner.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await joiner.task
    assert "no process on its port" in caplog.text
    assert detected_s < MeshTimings().dead_after_s, f"{detected_s:.2f} s: found by silence"
