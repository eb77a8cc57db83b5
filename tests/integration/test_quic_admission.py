"""Real QUIC on loopback: endpoints, key pinning, the admission hello, bad input on streams."""

from __future__ import annotations

import asyncio
import os
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest

from mesh_llm.core.types import NodeId
from mesh_llm.errors import AdmissionRefused, PeerUnavailable, ProtocolError, StreamReset
from mesh_llm.identity import MeshSecret, NodeIdentity, new_mesh
from mesh_llm.net.hello import (
    FramedChannel,
    admit_inbound,
    admit_outbound,
)
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.wire.codec import encode_frame
from mesh_llm.wire.messages import (
    NONCE_BYTES,
    PROTOCOL_VERSION,
    Hello,
    Ping,
    RefuseCode,
    Refused,
    StreamType,
)
from tests.fakes.waiting import running

TIMEOUT_S = 10.0


@dataclass
class Listener:
    """A listening endpoint that admits control streams and records the outcome."""

    identity: NodeIdentity
    mesh: MeshSecret
    endpoint: QuicEndpoint | None = None
    admitted: list[NodeId] = field(default_factory=list)
    refused: list[AdmissionRefused] = field(default_factory=list)
    control_messages: list[object] = field(default_factory=list)

    async def on_stream(
        self, connection: QuicPeerConnection, kind: StreamType, stream: QuicStream
    ) -> None:
        channel = FramedChannel(stream)
        if kind is not StreamType.CONTROL:
            stream.reset(RefuseCode.UNKNOWN_STREAM)
            return
        try:
            admitted = await admit_inbound(channel, self.identity, self.mesh)
        except AdmissionRefused as exc:
            self.refused.append(exc)
            return
        self.admitted.append(admitted.node_id)
        while (message := await channel.receive()) is not None:
            self.control_messages.append(message)
            channel.send(message)  # echo


@pytest.fixture
async def listener() -> AsyncIterator[Listener]:
    state = Listener(NodeIdentity.generate(), new_mesh())
    state.endpoint = await QuicEndpoint.bind(
        state.identity, "127.0.0.1", 0, state.on_stream, lambda _c: None
    )
    try:
        async with running(state.endpoint.run()):  # serves the streams dialers open
            yield state
    finally:
        state.endpoint.close()


@pytest.fixture
async def dialer() -> AsyncIterator[tuple[NodeIdentity, QuicEndpoint]]:
    identity = NodeIdentity.generate()

    async def no_streams(c: QuicPeerConnection, k: StreamType, s: QuicStream) -> None:
        s.reset(RefuseCode.UNKNOWN_STREAM)

    endpoint = await QuicEndpoint.bind(identity, "127.0.0.1", 0, no_streams, lambda _c: None)
    try:
        async with running(endpoint.run()):
            yield identity, endpoint
    finally:
        endpoint.close()


async def _connect(
    dialer: tuple[NodeIdentity, QuicEndpoint], listener: Listener, expected: NodeId | None
) -> QuicPeerConnection:
    assert listener.endpoint is not None
    return await dialer[1].dial("127.0.0.1", listener.endpoint.port, expected, TIMEOUT_S)


async def test_admitted_with_right_secret_and_key(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, listener.identity.node_id)
        assert connection.peer_node_id() == listener.identity.node_id
        channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
        peer = await admit_outbound(
            channel, dialer[0], listener.mesh, expected=listener.identity.node_id
        )
        assert peer == listener.identity.node_id
        channel.send(Ping(7))
        assert await channel.receive() == Ping(7)
    assert listener.admitted == [dialer[0].node_id]


async def test_wrong_secret_refused_on_both_sides(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    wrong = MeshSecret(listener.mesh.mesh_id, os.urandom(32))
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, listener.identity.node_id)
        channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
        with pytest.raises(AdmissionRefused, match="wrong mesh secret") as refused:
            await admit_outbound(channel, dialer[0], wrong, expected=listener.identity.node_id)
    assert refused.value.code == RefuseCode.BAD_SECRET
    assert listener.admitted == []


async def test_listener_refuses_a_dialer_with_the_wrong_secret(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    """The dialer skips checking the listener and sends proofs with a wrong secret."""
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, None)
        channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
        wrong = MeshSecret(listener.mesh.mesh_id, os.urandom(32))
        hello = Hello(PROTOCOL_VERSION, dialer[0].node_id, wrong.mesh_id, os.urandom(NONCE_BYTES))
        channel.send(hello)
        await channel.receive()  # the reply
        from mesh_llm.wire.messages import HelloFinish

        channel.send(HelloFinish(b"x" * 64, b"y" * 32))
        answer = await channel.receive()
    assert isinstance(answer, Refused) and answer.code == RefuseCode.BAD_SECRET
    assert "wrong mesh secret" in answer.reason
    assert len(listener.refused) == 1


async def test_other_mesh_and_old_version_refused(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        for hello, code in (
            (
                Hello(PROTOCOL_VERSION, dialer[0].node_id, "0" * 32, os.urandom(32)),
                RefuseCode.WRONG_MESH,
            ),
            (
                Hello(0, dialer[0].node_id, listener.mesh.mesh_id, os.urandom(32)),
                RefuseCode.VERSION_MISMATCH,
            ),
        ):
            connection = await _connect(dialer, listener, None)
            channel = FramedChannel(await connection.open_stream(StreamType.CONTROL))
            channel.send(hello)
            answer = await channel.receive()
            assert isinstance(answer, Refused) and answer.code == code, answer


async def test_key_mismatch_aborts_the_dial(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    impostor = NodeIdentity.generate().node_id
    async with asyncio.timeout(TIMEOUT_S):
        with pytest.raises(ProtocolError, match="expected") as refused:
            await _connect(dialer, listener, impostor)
    assert refused.value.code == RefuseCode.KEY_MISMATCH


async def test_unreachable_port_is_peer_unavailable(
    dialer: tuple[NodeIdentity, QuicEndpoint],
) -> None:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))  # bound but never answers
        port = silent.getsockname()[1]
        with pytest.raises(PeerUnavailable):
            await dialer[1].dial("127.0.0.1", port, None, 1.0)


@pytest.mark.parametrize(
    "garbage",
    [
        b"\xff\xff\xff\xff",  # declared frame far over the limit
        struct.pack(">I", 3) + b"\xc1\xc1\xc1",  # invalid msgpack
        encode_frame(Ping(1)),  # a valid frame, but not a hello
        os.urandom(300),
    ],
)
async def test_garbage_on_control_stream_is_refused_and_node_keeps_serving(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint], garbage: bytes
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, None)
        stream = await connection.open_stream(StreamType.CONTROL)
        stream.write(garbage)
        channel = FramedChannel(stream)
        answer = await channel.receive()
        assert isinstance(answer, Refused) and answer.code == RefuseCode.PROTOCOL_ERROR
        # The listener still admits a well-behaved peer afterwards.
        good = await _connect(dialer, listener, listener.identity.node_id)
        good_channel = FramedChannel(await good.open_stream(StreamType.CONTROL))
        await admit_outbound(
            good_channel, dialer[0], listener.mesh, expected=listener.identity.node_id
        )


async def test_unknown_stream_type_is_reset(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, None)
        stream_id = connection._quic.get_next_available_stream_id()
        stream = connection._stream(stream_id)
        stream.write(b"\x7fhello")
        with pytest.raises(StreamReset):
            while await stream.read():
                pass
        assert not connection.is_closed  # only the stream died


async def test_reader_wakes_when_connection_closes(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, None)
        stream = await connection.open_stream(StreamType.CONTROL)
        reader = asyncio.ensure_future(stream.read())
        await asyncio.sleep(0.05)
        connection.close()
        with pytest.raises(StreamReset):
            await reader


async def test_a_write_aioquic_refuses_is_a_stream_reset(
    listener: Listener, dialer: tuple[NodeIdentity, QuicEndpoint]
) -> None:
    """aioquic raises RuntimeError on a write after its sender was reset (as it does itself on
    a peer's STOP_SENDING) or finished: the wrapper turns that into `StreamReset`, the error
    every stream handler expects, instead of an unexpected exception and traceback."""
    async with asyncio.timeout(TIMEOUT_S):
        connection = await _connect(dialer, listener, None)
        stream = await connection.open_stream(StreamType.CONTROL)
        connection._quic._streams[stream.stream_id].sender.reset(0)
        with pytest.raises(StreamReset, match="cannot be written"):
            stream.write(b"more")
        finished = await connection.open_stream(StreamType.CONTROL)
        connection._quic.send_stream_data(finished.stream_id, b"", end_stream=True)
        with pytest.raises(StreamReset, match="cannot be written"):
            finished.write(b"after FIN")
