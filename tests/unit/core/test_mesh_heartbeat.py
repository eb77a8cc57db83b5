"""Heartbeats: a peer that pings us is not pinged back every interval (half the messages of a
link at rest), yet both ends keep hearing each other, both measure RTT, and silence is still
found at the same time."""

from __future__ import annotations

import pytest

from mesh_llm.core.events import PeerLost, PeerSuspected
from mesh_llm.core.membership import HEARTBEAT_RTT_EVERY, PeerLink
from mesh_llm.core.mesh import MeshCore
from mesh_llm.wire.messages import Message, Ping

from .helpers import TIMINGS, events, make_core, nid

INTERVAL = TIMINGS.heartbeat_interval_s


@pytest.mark.parametrize(
    ("pinged_ago", "skipped", "pings", "skipped_after"),
    [
        (None, 0, True, 0),  # never pinged by the peer: ping
        (2.0, 0, True, 0),  # its last ping is older than an interval: ping
        (INTERVAL, 0, True, 0),  # exactly one interval ago: too old
        (0.5, 0, False, 1),  # it pinged us half an interval ago: skip
        (0.5, HEARTBEAT_RTT_EVERY - 2, False, HEARTBEAT_RTT_EVERY - 1),
        (0.5, HEARTBEAT_RTT_EVERY - 1, True, 0),  # every HEARTBEAT_RTT_EVERY-th beat: RTT ping
    ],
)
def test_which_heartbeat_pings_the_peer(
    pinged_ago: float | None, skipped: int, pings: bool, skipped_after: int
) -> None:
    now = 100.0
    link = PeerLink("p", last_heard=now, skipped=skipped)
    link.peer_pinged_at = None if pinged_ago is None else now - pinged_ago
    assert link.needs_heartbeat(now, INTERVAL) is pings
    if pings:
        link.ping_sent(1, now)
    assert link.skipped == skipped_after


class Pair:
    """Two linked cores, heartbeat phases apart, messages delayed `delay_s` each way."""

    def __init__(self, offset_s: float, delay_s: float) -> None:
        self.cores = {nid("1"): make_core("1"), nid("2"): make_core("2", now=offset_s)}
        self.delay_s = delay_s
        self.alive = set(self.cores)
        self.flight: list[tuple[float, str, str, Message]] = []
        self.pings = dict.fromkeys(self.cores, 0)
        self.log: dict[str, list[object]] = {node: [] for node in self.cores}
        (a, core_a), (b, core_b) = self.cores.items()
        core_a.link_up(b, 0.0)
        core_b.link_up(a, offset_s)
        self.now = 0.0

    def run(self, until: float, step: float = 0.001) -> None:
        while self.now < until:
            self.now += step
            due = [m for m in self.flight if m[0] <= self.now]
            self.flight = [m for m in self.flight if m[0] > self.now]
            for _, sender, to, msg in due:
                if to in self.alive:
                    self.cores[to].receive(sender, msg, self.now)
            for node, core in self.cores.items():
                if node not in self.alive:
                    continue
                deadline = core.next_deadline()
                if deadline is not None and deadline <= self.now:
                    core.tick(self.now)
                for to, msg in core.outbox():
                    self.pings[node] += isinstance(msg, Ping)
                    self.flight.append((self.now + self.delay_s, node, to, msg))
                self.log[node] += events(core)


@pytest.mark.parametrize(("offset_s", "delay_s"), [(0.3, 0.005), (0.02, 0.010), (0.7, 0.001)])
def test_a_link_at_rest_carries_about_one_ping_per_interval_and_both_ends_measure_rtt(
    offset_s: float, delay_s: float
) -> None:
    pair = Pair(offset_s, delay_s)
    pair.run(60.0)
    total = sum(pair.pings.values())
    # Both ends pinging every interval was 2 per interval; now one, plus every
    # HEARTBEAT_RTT_EVERY-th beat's RTT ping of the other end.
    assert total / 60.0 <= 1.0 + 1.0 / HEARTBEAT_RTT_EVERY + 0.1, pair.pings
    assert min(pair.pings.values()) >= 60.0 / HEARTBEAT_RTT_EVERY / 2, pair.pings
    for node, core in pair.cores.items():
        other = next(n for n in pair.cores if n != node)
        assert not any(isinstance(e, PeerSuspected | PeerLost) for e in pair.log[node])
        assert core.rtt_ms(other) == pytest.approx(2000 * delay_s, abs=2.5)  # 1 ms steps
        assert other in core.self_record().rtt_ms  # published: ≥ MIN_RTT_SAMPLES samples


@pytest.mark.parametrize("victim", ["1", "2"])
def test_a_silent_peer_is_still_suspect_at_6_s_and_dead_at_10_s(victim: str) -> None:
    pair = Pair(0.3, 0.005)
    pair.run(30.0)
    survivor: MeshCore = pair.cores[nid("2" if victim == "1" else "1")]
    pair.alive.discard(nid(victim))  # stops answering, its link stays up
    killed = pair.now
    pings_before = pair.pings[survivor.node_id]
    pair.run(killed + TIMINGS.dead_after_s + 1.0)
    log = pair.log[survivor.node_id]
    kinds = {type(e) for e in log}
    assert PeerSuspected in kinds and PeerLost in kinds
    assert nid(victim) in survivor.dead_peers()
    # The survivor pinged the silent peer every interval once its pings stopped.
    assert pair.pings[survivor.node_id] - pings_before >= TIMINGS.dead_after_s / INTERVAL - 2


def test_a_silent_peer_is_declared_dead_within_the_same_window_as_before() -> None:
    pair = Pair(0.3, 0.005)
    pair.run(30.0)
    pair.alive.discard(nid("2"))
    killed = pair.now
    survivor = pair.cores[nid("1")]
    while nid("2") not in survivor.dead_peers():
        pair.run(pair.now + 0.05)
        assert pair.now < killed + TIMINGS.dead_after_s + 1.0
    # The last thing heard was at most one interval (+ delays) before the silence began.
    detected = pair.now - killed
    assert TIMINGS.dead_after_s - INTERVAL - 0.1 <= detected <= TIMINGS.dead_after_s + 0.1
