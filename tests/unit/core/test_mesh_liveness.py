"""MeshCore liveness: heartbeats, suspect/dead by silence, peer-down notices, leaves, RTT."""

from __future__ import annotations

import copy
import random

import pytest

from mesh_llm.core.events import (
    ClosePeer,
    PeerLeft,
    PeerLost,
    PeerRecovered,
    PeerSuspected,
)
from mesh_llm.core.membership import MIN_RTT_SAMPLES
from mesh_llm.core.mesh import MeshCore
from mesh_llm.wire.messages import (
    Digest,
    Leaving,
    PeerDown,
    Ping,
    Pong,
    Records,
)

from .helpers import TIMINGS, events, linked, make_core, nid, record, sent, sent_to


def known(core: MeshCore, *chars: str, now: float = 0.0) -> MeshCore:
    """`core` linked to `chars` and holding their records, outputs drained."""
    linked(core, *chars, now=now)
    core.receive(nid(chars[0]), Records(tuple(record(c) for c in chars)), now)
    core.outbox()
    events(core)
    return core


def test_heartbeat_pings_every_linked_peer_each_interval() -> None:
    core = linked(make_core("1"), "2", "3")
    core.tick(TIMINGS.heartbeat_interval_s)
    pings = [(to, msg) for to, msg in sent(core) if isinstance(msg, Ping)]
    assert sorted(to for to, _ in pings) == [nid("2"), nid("3")]
    core.receive(nid("2"), Ping(41), 1.0)
    assert sent_to(core, nid("2")) == [Pong(41)]


def test_silence_makes_a_peer_suspect_then_dead() -> None:
    suspect_at, dead_at = TIMINGS.suspect_after_s, TIMINGS.dead_after_s
    core = known(make_core("1"), "2", "3")
    core.receive(nid("3"), Digest({}), 0.0)
    now = 0.0
    while now + 0.5 < suspect_at:
        now += 0.5
        core.tick(now)
        core.receive(nid("3"), Pong(0), now)  # "3" keeps talking, "2" is silent
    core.tick(suspect_at - 0.01)
    assert events(core) == []
    core.tick(suspect_at)
    core.receive(nid("3"), Pong(0), suspect_at)
    assert events(core) == [PeerSuspected(nid("2"))]
    assert core.peer_state(nid("2")) == "suspect"
    now = suspect_at
    while now + 0.5 < dead_at:
        now += 0.5
        core.tick(now)
        core.receive(nid("3"), Pong(0), now)
    core.tick(dead_at - 0.01)
    assert events(core) == []
    sent(core)
    core.tick(dead_at)
    reason = f"silent for {dead_at:.1f} s"
    assert events(core) == [PeerLost(nid("2"), reason), ClosePeer(nid("2"), reason)]
    assert nid("2") not in core.records() and core.peer_state(nid("2")) is None
    assert nid("2") in core.dead_peers()
    notices = [(to, m) for to, m in sent(core) if isinstance(m, PeerDown)]
    assert notices == [(nid("3"), PeerDown(nid("2"), reason))]


def test_the_defaults_meet_the_detection_goals() -> None:
    """A link lost without FIN is dead within 6 s of its last message, and a peer is suspect
    before that; a refused peer takes at most the refusal window."""
    assert TIMINGS.suspect_after_s < TIMINGS.dead_after_s <= 6.0
    probes_needed = (TIMINGS.refusals_to_die - 1) * TIMINGS.refusal_probe_interval_s
    assert probes_needed < TIMINGS.refusal_window_s <= 2.0


def test_any_message_recovers_a_suspect_peer() -> None:
    core = known(make_core("1"), "2")
    core.tick(TIMINGS.suspect_after_s + 0.5)
    assert events(core) == [PeerSuspected(nid("2"))]
    heard_at = TIMINGS.suspect_after_s + 1.0
    core.receive(nid("2"), Digest({}), heard_at)
    assert events(core) == [PeerRecovered(nid("2"))]
    core.tick(heard_at + TIMINGS.heartbeat_interval_s)
    core.tick(heard_at + TIMINGS.suspect_after_s - 0.1)
    assert events(core) == []  # the silence counts from heard_at now


def test_link_down_drops_the_peer_at_once_and_notifies_the_others() -> None:
    core = known(make_core("1"), "2", "3")
    core.link_down(nid("2"), 1.0, "connection lost")
    assert events(core) == [PeerLost(nid("2"), "connection lost")]  # no ClosePeer: it is closed
    assert sent(core) == [(nid("3"), PeerDown(nid("2"), "connection lost"))]
    assert core.dead_peers() == {nid("2"): 1.0 + TIMINGS.dead_ttl_s}
    core.receive(nid("3"), Records((record("2", 99),)), 2.0)  # gossip must not resurrect it
    assert nid("2") not in core.records() and events(core) == []
    core.link_down(nid("2"), 2.0, "again")
    assert events(core) == [] and sent(core) == []


def test_a_peer_down_notice_about_a_reachable_peer_is_verified_and_fails() -> None:
    core = known(make_core("1"), "2", "3")
    core.receive(nid("2"), PeerDown(nid("3"), "silent"), 1.0)
    probes = sent_to(core, nid("3"))
    assert len(probes) == 1 and isinstance(probes[0], Ping)
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= 1.0 + TIMINGS.probe_timeout_s
    core.receive(nid("3"), Pong(probes[0].seq), 1.2)  # it answers: it lives
    for now in (2.0, 3.0, 4.0, 5.0):
        core.tick(now)
        core.receive(nid("3"), Pong(0), now)
        core.receive(nid("2"), Pong(0), now)
    assert events(core) == []
    assert core.peer_state(nid("3")) == "alive"


def test_a_peer_down_notice_about_an_unreachable_peer_drops_it_after_the_probe() -> None:
    core = known(make_core("1"), "2", "3")
    core.receive(nid("2"), PeerDown(nid("3"), "silent"), 1.0)
    core.tick(1.0 + TIMINGS.probe_timeout_s / 2)
    core.receive(nid("2"), Pong(0), 1.0 + TIMINGS.probe_timeout_s / 2)
    core.tick(1.0 + TIMINGS.probe_timeout_s - 0.01)
    core.receive(nid("2"), Pong(0), 1.0 + TIMINGS.probe_timeout_s - 0.01)
    assert not [e for e in events(core) if not isinstance(e, PeerSuspected)]
    sent(core)
    core.tick(1.0 + TIMINGS.probe_timeout_s)
    lost, close = events(core)
    assert isinstance(lost, PeerLost) and isinstance(close, ClosePeer)
    assert lost.node_id == close.node_id == nid("3")
    assert [m for _, m in sent(core) if isinstance(m, PeerDown)] == [
        PeerDown(nid("3"), lost.reason)
    ]


def test_a_peer_down_notice_about_a_suspect_peer_drops_it_at_once() -> None:
    core = known(make_core("1"), "2", "3")
    suspect_at = TIMINGS.suspect_after_s
    for now in (suspect_at / 2, suspect_at):
        core.tick(now)
        core.receive(nid("2"), Pong(0), now)
    events(core)
    core.receive(nid("2"), PeerDown(nid("3"), "silent"), suspect_at + 0.5)
    assert [type(e) for e in events(core)] == [PeerLost, ClosePeer]


def test_a_peer_down_notice_about_an_unlinked_node_drops_and_forwards_it_once() -> None:
    core = known(make_core("1"), "2", "3")
    core.receive(nid("2"), Records((record("9"),)), 0.0)
    events(core)
    sent(core)
    core.receive(nid("2"), PeerDown(nid("9"), "silent"), 1.0)
    assert events(core) == [PeerLost(nid("9"), "reported down by 2222222222: silent")]
    assert sent(core) == [(nid("3"), PeerDown(nid("9"), "silent"))]
    assert nid("9") in core.dead_peers()
    core.receive(nid("3"), PeerDown(nid("9"), "silent"), 1.1)  # the echo stops here
    assert events(core) == [] and sent(core) == []


def test_peer_down_about_ourselves_or_the_sender_is_ignored() -> None:
    core = known(make_core("1"), "2")
    core.receive(nid("2"), PeerDown(nid("1")), 1.0)
    core.receive(nid("2"), PeerDown(nid("2")), 1.0)
    assert events(core) == [] and sent(core) == []


def test_leaving_drops_the_node_at_once() -> None:
    core = known(make_core("1"), "2", "3")
    core.receive(nid("2"), Leaving(nid("2")), 1.0)
    assert events(core) == [PeerLeft(nid("2")), ClosePeer(nid("2"), "left the mesh")]
    assert nid("2") not in core.records() and nid("2") not in core.linked_peers()
    assert nid("2") in core.dead_peers()
    assert sent(core) == [(nid("3"), Leaving(nid("2")))]
    core.receive(nid("3"), Leaving(nid("2")), 1.1)
    core.link_down(nid("2"), 1.2, "closed")
    assert events(core) == [] and sent(core) == []


def test_dead_entries_expire_after_the_ttl() -> None:
    core = known(make_core("1"), "2", "3")
    core.link_down(nid("2"), 0.0, "closed")
    for now in range(1, int(TIMINGS.dead_ttl_s), 1):
        core.tick(float(now))
        core.receive(nid("3"), Pong(0), float(now))
    core.receive(nid("3"), Records((record("2", 5),)), TIMINGS.dead_ttl_s - 0.5)
    assert nid("2") not in core.records()
    core.tick(TIMINGS.dead_ttl_s)
    assert core.dead_peers() == {}
    core.receive(nid("3"), Records((record("2", 5),)), TIMINGS.dead_ttl_s)
    assert core.records()[nid("2")].version == 5


def test_link_up_clears_a_dead_entry() -> None:
    core = known(make_core("1"), "2")
    core.link_down(nid("2"), 1.0, "closed")
    core.link_up(nid("2"), 2.0)  # it came back (a new inbound connection)
    assert core.dead_peers() == {}
    core.receive(nid("2"), Records((record("2", 1),)), 2.0)
    assert core.records()[nid("2")].version == 1


def last_ping(core: MeshCore, char: str) -> int:
    return [m.seq for m in sent_to(core, nid(char)) if isinstance(m, Ping)][-1]


def test_rtt_is_measured_and_republished_only_on_a_real_change() -> None:
    core = known(make_core("1"), "2")
    now = 0.0
    for _ in range(MIN_RTT_SAMPLES + 4):  # round trips of 20 ms
        now += 1.0
        core.tick(now)
        core.receive(nid("2"), Pong(last_ping(core, "2")), now + 0.020)
    assert core.rtt_ms(nid("2")) == pytest.approx(20.0)
    assert core.self_record().rtt_ms == {nid("2"): pytest.approx(20.0)}
    version = core.self_record().version
    for delay in (0.022, 0.018, 0.023, 0.021):  # jitter below 25 %: no new version
        now += 1.0
        core.tick(now)
        core.receive(nid("2"), Pong(last_ping(core, "2")), now + delay)
    assert core.self_record().version == version
    for _ in range(40):  # the path slows to 60 ms
        now += 1.0
        core.tick(now)
        core.receive(nid("2"), Pong(last_ping(core, "2")), now + 0.060)
    assert core.self_record().version > version
    assert core.self_record().rtt_ms[nid("2")] > 25.0


def test_unknown_pong_sequences_are_ignored() -> None:
    core = known(make_core("1"), "2")
    core.receive(nid("2"), Pong(12345), 0.5)
    assert core.rtt_ms(nid("2")) is None


# -- next_deadline ----------------------------------------------------------------------------


def random_input(core: MeshCore, rng: random.Random, now: float) -> None:
    peer = nid(rng.choice("2345"))
    match rng.randrange(8):
        case 0:
            core.link_up(peer, now)
        case 1:
            core.link_down(peer, now, "closed")
        case 2:
            core.receive(peer, Records((record(rng.choice("56789"), rng.randint(1, 4)),)), now)
        case 3:
            core.receive(peer, PeerDown(nid(rng.choice("2345678"))), now)
        case 4:
            core.receive(peer, Pong(rng.randint(0, 30)), now)
        case 5:
            core.receive(peer, Leaving(nid(rng.choice("2345678"))), now)
        case 6:
            core.update_self(now, name=f"n{rng.random()}")
        case _:
            core.receive(peer, Records((record(peer[0], rng.randint(1, 4)),)), now)


@pytest.mark.parametrize("seed", range(12))
def test_nothing_is_ever_due_before_next_deadline(seed: int) -> None:
    """Ticking any time before next_deadline does nothing; ticking at it keeps things going."""
    rng = random.Random(seed)
    core = make_core("1", seed=seed)
    now = 0.0
    for _ in range(300):
        if rng.random() < 0.5:
            random_input(core, rng, now)
        deadline = core.next_deadline()
        if deadline is None:
            now += rng.uniform(0.0, 5.0)
            continue
        assert deadline >= now
        probe = copy.deepcopy(core)
        probe.outbox()
        events(probe)
        early = max(now, deadline - rng.uniform(1e-6, 2.0))
        if early < deadline:
            probe.tick(early)
            assert probe.outbox() == [] and events(probe) == []
        now = max(now, deadline) if rng.random() < 0.7 else now + rng.uniform(0.0, 1.0)
        core.tick(now)


def test_a_failed_request_probes_the_peer_and_drops_it_without_an_answer() -> None:
    core = known(make_core("1"), "2", "3")
    core.report_failure(nid("3"), 1.0)
    probes = sent_to(core, nid("3"))
    assert len(probes) == 1 and isinstance(probes[0], Ping)
    core.report_failure(nid("3"), 1.5)  # a second failure does not probe again
    assert sent_to(core, nid("3")) == []
    core.receive(nid("2"), Pong(0), 3.0)
    core.tick(1.0 + TIMINGS.probe_timeout_s)
    lost, close = events(core)
    assert isinstance(lost, PeerLost) and lost.node_id == nid("3")
    assert isinstance(close, ClosePeer)


def test_a_failed_request_to_a_live_peer_changes_nothing() -> None:
    core = known(make_core("1"), "2")
    core.report_failure(nid("2"), 1.0)
    (probe,) = sent_to(core, nid("2"))
    assert isinstance(probe, Ping)
    core.receive(nid("2"), Pong(probe.seq), 1.1)
    core.tick(1.0 + TIMINGS.probe_timeout_s + 0.1)
    assert events(core) == [] and core.peer_state(nid("2")) == "alive"
    core.report_failure(nid("unknown"), 2.0)  # unlinked: ignored
    assert events(core) == []


def test_re_linking_a_buried_peer_forgets_every_dead_mark() -> None:
    # A partition: "1" declared "2" and "3" dead. It heals: "2" links again. "3"'s record,
    # gossiped by "2", must be accepted (and dialed), or "1" and "3" stay apart for the TTL.
    core = known(make_core("1"), "2", "3")
    core.link_down(nid("2"), 1.0, "silent")
    core.link_down(nid("3"), 1.0, "silent")
    assert set(core.dead_peers()) == {nid("2"), nid("3")}
    core.link_up(nid("2"), 40.0)
    assert core.dead_peers() == {}
    core.receive(nid("2"), Records((record("3", 2),)), 40.0)
    assert core.records()[nid("3")].version == 2


def test_a_new_link_to_a_peer_never_buried_keeps_the_dead_marks() -> None:
    core = known(make_core("1"), "2")
    core.link_down(nid("2"), 1.0, "closed")  # "2" died
    core.link_up(nid("4"), 2.0)  # a new node joins: no partition healed
    assert set(core.dead_peers()) == {nid("2")}
    core.receive(nid("4"), Records((record("2", 5),)), 2.0)
    assert nid("2") not in core.records()


# -- refused packets: a process death hint that probes confirm ------------------------------


def refused_probes(core: MeshCore, peer: str, start: float, count: int) -> float:
    """Refuse `count` probes to `peer` as the core sends them; the time of the last."""
    now = start
    core.peer_refused(nid(peer), now)
    for _ in range(count - 1):
        due = core.next_deadline()
        assert due is not None and due <= now + TIMINGS.refusal_probe_interval_s
        now += TIMINGS.refusal_probe_interval_s
        core.tick(now)
        assert any(isinstance(m, Ping) for m in sent_to(core, nid(peer))), "a probe is sent"
        core.peer_refused(nid(peer), now)
    return now


def test_refused_probes_make_a_peer_dead_within_the_refusal_window() -> None:
    core = known(make_core("1"), "2", "3")
    last = refused_probes(core, "2", 1.1, TIMINGS.refusals_to_die)
    assert last - 1.1 < TIMINGS.refusal_window_s
    lost, close = events(core)
    assert isinstance(lost, PeerLost) and lost.node_id == nid("2") and "refused" in lost.reason
    assert isinstance(close, ClosePeer)
    assert [(to, m) for to, m in sent(core) if isinstance(m, PeerDown)] == [
        (nid("3"), PeerDown(nid("2"), lost.reason))
    ]


def test_one_burst_of_refusals_is_one_hint_not_a_verdict() -> None:
    core = known(make_core("1"), "2")
    for i in range(10):  # a ping, its retransmissions and an ACK, all refused at once
        core.peer_refused(nid("2"), 1.0 + i * 0.001)
    assert events(core) == []
    assert core.peer_state(nid("2")) == "alive"


def test_a_message_from_the_peer_clears_its_refusals() -> None:
    core = known(make_core("1"), "2")
    last = refused_probes(core, "2", 1.1, TIMINGS.refusals_to_die - 1)
    core.receive(nid("2"), Pong(0), last + 0.01)  # it answered after all (it restarted)
    refused_probes(core, "2", last + 0.1, TIMINGS.refusals_to_die - 1)
    assert events(core) == []


def test_refusals_further_apart_than_the_window_give_no_verdict() -> None:
    core = known(make_core("1"), "2")
    spacing = TIMINGS.refusal_window_s / (TIMINGS.refusals_to_die - 1) + 0.01
    for i in range(5):
        now = 0.1 + i * spacing
        core.peer_refused(nid("2"), now)
    assert not [e for e in events(core) if isinstance(e, PeerLost)]


def test_refusals_from_an_unlinked_peer_are_ignored() -> None:
    core = known(make_core("1"), "2")
    core.peer_refused(nid("9"), 1.0)
    assert events(core) == [] and sent(core) == []


# -- a stall of this node is not its peers' silence ---------------------------------------


def test_a_stall_of_this_node_is_not_counted_as_silence() -> None:
    core = known(make_core("1"), "2")
    core.tick(1.0)
    core.receive(nid("2"), Pong(0), 1.0)
    stalled_until = 1.0 + TIMINGS.dead_after_s + 5.0  # the loop was blocked, then ticks late
    core.tick(stalled_until)
    assert events(core) == []
    assert core.peer_state(nid("2")) == "alive"
    # Still silent after the stall: dead once the silence since the stall is long enough.
    now = stalled_until
    while not [e for e in events(core) if isinstance(e, PeerLost)]:
        now += 0.5
        core.tick(now)
        assert now - stalled_until <= TIMINGS.dead_after_s + TIMINGS.heartbeat_interval_s
