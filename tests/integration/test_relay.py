"""Relayed streams between in-process mesh shells on loopback: real QUIC, real admission.

A and B join seed S but advertise addresses nobody can dial (as behind two NATs), so they
never link each other. An API stream from A to B goes through S, sealed end to end: B's
handler sees A as the peer, S counts the stream it relayed, and A's transport says so.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator

import pytest

from mesh_llm.config import NetConfig
from mesh_llm.core.mesh import MeshCore, MeshTimings
from mesh_llm.core.types import NodeId
from mesh_llm.errors import PeerUnavailable, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity, new_mesh
from mesh_llm.net.peers import PeerManager
from mesh_llm.net.relay import RelayHop
from mesh_llm.net.streams import ByteStream
from mesh_llm.net.transport import PeerTransport, StreamHandlers
from mesh_llm.token import InviteToken
from mesh_llm.wire.messages import NodeRecord, StreamType
from tests.fakes.waiting import wait_until

UNREACHABLE = "127.0.0.1:9"  # nothing listens: a dial there is refused at once


class Shell:
    def __init__(self, mesh: MeshSecret, tokens: tuple[InviteToken, ...] = ()) -> None:
        self.identity = NodeIdentity.generate()
        self.mesh = mesh
        loop = asyncio.get_running_loop()
        record = NodeRecord(node_id=self.identity.node_id, version=1, name="test")
        core = MeshCore(record, MeshTimings(), random.Random(1), loop.time())
        self.handlers = StreamHandlers()
        self.peers = PeerManager(
            self.identity,
            mesh,
            core,
            tokens=tokens,
            timings=NetConfig(),
            inbound=self.handlers.accept,
        )
        self.relay = RelayHop(
            self.identity, mesh, self.peers, self.handlers.accept, handshake_timeout_s=5.0
        )
        self.handlers.serve(StreamType.RELAY, self.relay.serve_relay)
        self.handlers.serve(StreamType.RELAYED, self.relay.serve_relayed)
        self.transport = PeerTransport(
            self.identity,
            self.peers,
            fast_lane_purposes=frozenset(),
            connect_timeout_s=5.0,
            fast_lane_retry_s=60.0,
            relay=self.relay,
        )
        self.served_for: list[NodeId] = []
        self.handlers.serve(StreamType.HTTP, self._echo)
        self.task: asyncio.Task[None] | None = None

    @property
    def node_id(self) -> NodeId:
        return self.identity.node_id

    async def _echo(self, stream: ByteStream, peer: NodeId) -> None:
        self.served_for.append(peer)
        data = await stream.read_exactly(4)
        stream.write(b"pong:" + data)
        await stream.drain()
        stream.close()

    async def start(self, advertise: str | None = None) -> InviteToken:
        port = await self.peers.bind("127.0.0.1", 0)
        self.task = asyncio.get_running_loop().create_task(self.peers.run())
        addrs = (advertise or f"127.0.0.1:{port}",)
        self.peers.update_self(addrs=addrs)
        return InviteToken(
            self.mesh.mesh_id, self.mesh.secret, self.node_id, (f"127.0.0.1:{port}",)
        )

    def knows(self, node: NodeId) -> bool:
        return any(r.node_id == node for r in self.peers.records())

    async def stop(self) -> None:
        if self.task is not None:
            await self.peers.leave()
            self.task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self.task


@pytest.fixture
async def three() -> AsyncIterator[tuple[Shell, Shell, Shell]]:
    mesh = new_mesh()
    seed = Shell(mesh)
    token = await seed.start()
    a, b = Shell(mesh, (token,)), Shell(mesh, (token,))
    await a.start(advertise=UNREACHABLE)
    await b.start(advertise=UNREACHABLE)
    try:
        await wait_until(lambda: a.knows(b.node_id) and b.knows(a.node_id), "gossip via the seed")
        yield seed, a, b
    finally:
        for shell in (a, b, seed):
            await shell.stop()


async def test_an_api_stream_to_an_unreachable_node_goes_through_the_seed_sealed(
    three: tuple[Shell, Shell, Shell],
) -> None:
    seed, a, b = three
    assert not a.peers.is_linked(b.node_id), "a and b must not reach each other directly"
    stream = await a.transport.open(b.node_id, StreamType.HTTP)
    assert stream.lane == "relay"
    stream.write(b"ping")
    await stream.drain()
    assert await stream.read_exactly(9) == b"pong:ping"
    assert await stream.read() == b""
    assert b.served_for == [a.node_id], "b's handler sees a, not the relay, as the peer"
    assert seed.relay.relayed["relayed"] == 1 and b.relay.relayed["accepted"] == 1
    assert a.transport.relayed_now() == {b.node_id: seed.node_id}
    assert "no direct link" in a.transport.reason_of(b.node_id)
    # The next stream goes straight to the relay (remembered), and works the same.
    again = await a.transport.open(b.node_id, StreamType.HTTP)
    again.write(b"more")
    assert await again.read_exactly(9) == b"pong:more"
    assert seed.relay.relayed["relayed"] == 2


async def test_rpc_is_never_relayed(three: tuple[Shell, Shell, Shell]) -> None:
    _, a, b = three
    with pytest.raises(PeerUnavailable):
        await a.transport.open(b.node_id, StreamType.RPC)


async def test_a_relay_without_a_link_to_the_target_refuses(
    three: tuple[Shell, Shell, Shell],
) -> None:
    seed, a, _ = three
    stranger = NodeIdentity.generate().node_id
    with pytest.raises(PeerUnavailable, match="NO_ROUTE"):
        await a.relay.open(stranger, StreamType.HTTP)
    assert seed.relay.relayed["refused"] == 1


async def test_an_abort_at_the_opener_reaches_the_target_through_the_relay(
    three: tuple[Shell, Shell, Shell],
) -> None:
    """A client that goes away mid-request: the host's handler must see its stream fail (that
    is what cancels the llama-server request), and the relay lets both streams go."""
    seed, a, b = three
    failed, started = asyncio.Event(), asyncio.Event()

    async def hold(stream: ByteStream, peer: NodeId) -> None:
        started.set()
        try:
            while await stream.read():
                pass
        except StreamReset:
            failed.set()
            raise

    b.handlers.serve(StreamType.HTTP, hold)
    stream = await a.transport.open(b.node_id, StreamType.HTTP)
    stream.write(b"a request that is never finished")
    await stream.drain()
    await asyncio.wait_for(started.wait(), 5.0)  # the handshake is done, the host is serving
    assert seed.relay.relaying == 1
    stream.abort()
    await asyncio.wait_for(failed.wait(), 5.0)
    await wait_until(lambda: seed.relay.relaying == 0, "the relay let both streams go")
