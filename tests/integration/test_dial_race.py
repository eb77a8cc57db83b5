"""`dial_link` races a token's addresses on loopback: real QUIC endpoints, real admission.

Dead addresses are UDP sockets that never answer (aioquic waits out the whole dial timeout on
each). Checked: with four dead addresses and one that answers with another node's key ahead
of the real one, the link is admitted within a few staggers, not a dial timeout per address;
the losing attempts leave no connection behind; with only dead addresses the dial fails after
about one dial timeout, not one per address.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from mesh_llm.config import NetConfig
from mesh_llm.errors import AdmissionRefused, PeerUnavailable
from mesh_llm.identity import NodeIdentity, new_mesh
from mesh_llm.net.links import dial_link
from mesh_llm.net.quic import QuicEndpoint, QuicPeerConnection
from mesh_llm.net.quic_stream import QuicStream
from mesh_llm.wire.messages import RefuseCode, StreamType
from tests.fakes.waiting import wait_until
from tests.integration.test_peers import Running

DIAL_TIMEOUT_S = 5.0  # NetConfig's default: sequential dials would cost 4 x 5 s here
BUDGET_S = 3.0  # the whole join with four dead addresses (staggers of 0.25 s + handshakes)


@contextmanager
def dead_addresses(count: int) -> Iterator[tuple[str, ...]]:
    """Bound UDP sockets that read nothing and answer nothing."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        yield tuple(f"127.0.0.1:{sock.getsockname()[1]}" for sock in sockets)
    finally:
        for sock in sockets:
            sock.close()


async def no_streams(c: QuicPeerConnection, k: StreamType, s: QuicStream) -> None:
    s.reset(RefuseCode.UNKNOWN_STREAM)


async def test_dead_and_foreign_addresses_cost_a_few_staggers_not_a_timeout_each() -> None:
    mesh = new_mesh()
    seed, other = Running(mesh), Running(new_mesh())
    token, other_token = await seed.start(), await other.start()
    dialer = NodeIdentity.generate()
    endpoint = await QuicEndpoint.bind(dialer, "127.0.0.1", 0, no_streams, lambda _c: None)
    try:
        with dead_addresses(4) as dead:
            addrs = (*dead, *other_token.addrs, *token.addrs)  # the real one comes last
            started = time.monotonic()
            link = await dial_link(
                endpoint,
                dialer,
                mesh,
                NetConfig(dial_timeout_s=DIAL_TIMEOUT_S),
                addrs,
                seed.identity.node_id,
                client=False,
            )
            elapsed = time.monotonic() - started
            print(f"admitted after {elapsed:.2f} s with 4 dead addresses and a foreign one")
            assert link.node_id == seed.identity.node_id and link.connection.admitted
            assert elapsed < BUDGET_S, elapsed
            attempts = [t for t in asyncio.all_tasks() if "_DialRace" in repr(t.get_coro())]
            assert attempts == []  # no attempt left behind
            # The losing attempts' connections are gone; only the winner's is left.
            await wait_until(
                lambda: set(endpoint._connections.values()) == {link.connection},
                "the losers' connections terminated",
            )
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "test over")
    finally:
        endpoint.close()
        await other.stop()
        await seed.stop()


async def test_only_dead_addresses_fail_after_about_one_dial_timeout() -> None:
    dialer = NodeIdentity.generate()
    endpoint = await QuicEndpoint.bind(dialer, "127.0.0.1", 0, no_streams, lambda _c: None)
    timeout_s = 1.0
    try:
        with dead_addresses(4) as dead:
            started = time.monotonic()
            with pytest.raises(PeerUnavailable) as failed:
                await dial_link(
                    endpoint,
                    dialer,
                    new_mesh(),
                    NetConfig(dial_timeout_s=timeout_s),
                    dead,
                    None,
                    client=False,
                )
            elapsed = time.monotonic() - started
        assert all(addr in str(failed.value) for addr in dead), failed.value
        # One timeout plus the staggers (4 x 1 s one after another would be 4 s).
        assert timeout_s <= elapsed < timeout_s + 4 * NetConfig().dial_stagger_s + 1.0, elapsed
        assert not endpoint._connections
    finally:
        endpoint.close()


async def test_a_refusal_stops_the_race() -> None:
    seed = Running(new_mesh())
    token = await seed.start()
    dialer = NodeIdentity.generate()
    endpoint = await QuicEndpoint.bind(dialer, "127.0.0.1", 0, no_streams, lambda _c: None)
    try:
        with dead_addresses(2) as dead:
            started = time.monotonic()
            with pytest.raises(AdmissionRefused):
                await dial_link(
                    endpoint,
                    dialer,
                    new_mesh(),  # the wrong secret
                    NetConfig(dial_timeout_s=DIAL_TIMEOUT_S),
                    (*token.addrs, *dead),
                    seed.identity.node_id,
                    client=False,
                )
            # Final at once: the dead addresses' attempts were cancelled, not waited out.
            assert time.monotonic() - started < BUDGET_S
        await wait_until(lambda: not endpoint._connections, "every attempt's connection gone")
    finally:
        endpoint.close()
        await seed.stop()
