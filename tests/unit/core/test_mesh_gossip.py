"""MeshCore records and gossip: joins, version rules, refutation, digests, dials."""

from __future__ import annotations

import pytest

from mesh_llm.core.events import (
    DialPeer,
    DuplicateNodeDetected,
    PeerJoined,
    RecordChanged,
)
from mesh_llm.core.gossip import SUMMARY_KEY, bucket_of, listing_digest
from mesh_llm.core.mesh import MeshCore, MeshTimings
from mesh_llm.wire.messages import (
    Digest,
    Hello,
    Leaving,
    Records,
    RouteRequest,
    Want,
)

from .helpers import TIMINGS, events, linked, make_core, nid, pump, record, sent, sent_to

DIAL_BACKOFF_S = MeshTimings().dial_backoff_s
DIAL_GRACE_S = MeshTimings().dial_grace_s


def test_link_up_sends_a_full_digest_at_once() -> None:
    core = make_core("1")
    core.link_up(nid("2"), 0.0)
    assert sent(core) == [(nid("2"), Digest({nid("1"): 1}))]
    assert core.linked_peers() == {nid("2")}
    assert core.peer_state(nid("2")) == "alive"


def test_join_exchanges_digests_and_merges_records() -> None:
    a, b = make_core("1"), make_core("2")
    linked(a, "3")
    a.receive(nid("3"), Records((record("3", 4),)), 0.0)
    events(a)
    a.link_up(nid("2"), 0.0)
    b.link_up(nid("1"), 0.0)
    pump({nid("1"): a, nid("2"): b}, 0.0)
    assert {k: r.version for k, r in b.records().items()} == {nid("1"): 1, nid("2"): 1, nid("3"): 4}
    assert a.records() == b.records()
    joined = [e for e in events(b) if isinstance(e, PeerJoined)]
    assert sorted(e.node_id for e in joined) == [nid("1"), nid("3")]


@pytest.mark.parametrize(
    ("incoming", "accepted", "event"),
    [(4, False, None), (5, False, None), (6, True, RecordChanged), (100, True, RecordChanged)],
)
def test_a_record_is_accepted_only_if_newer(
    incoming: int, accepted: bool, event: type | None
) -> None:
    core = linked(make_core("1"), "2")
    core.receive(nid("2"), Records((record("2", 5, name="old"),)), 0.0)
    assert isinstance(events(core)[0], PeerJoined)
    core.receive(nid("2"), Records((record("2", incoming, name="new"),)), 1.0)
    assert (core.records()[nid("2")].name == "new") is accepted
    got = events(core)
    assert [type(e) for e in got] == ([event] if event else [])


def test_a_stale_record_about_us_is_ignored_and_an_echo_too() -> None:
    core = linked(make_core("1", version=7), "2")
    core.receive(nid("2"), Records((record("1", 3, name="old"),)), 0.0)
    core.receive(nid("2"), Records((core.self_record(),)), 0.0)
    assert core.self_record().version == 7
    assert sent(core) == [] and events(core) == []


def test_a_newer_record_about_us_is_refuted_and_pushed_to_all_links() -> None:
    core = linked(make_core("1"), "2", "3")
    # After a restart the mesh remembers version 57 of our previous incarnation.
    core.receive(nid("2"), Records((record("1", 57, addrs=("10.9.9.9:1",)),)), 0.0)
    assert core.self_record().version == 58
    assert core.self_record().addrs == record("1").addrs  # our content, not the stale one
    pushed = sent(core)
    assert sorted(to for to, _ in pushed) == [nid("2"), nid("3")]
    assert all(msg == Records((core.self_record(),)) for _, msg in pushed)
    assert events(core) == []  # one conflict is a restart, not a duplicate


def test_a_twin_process_with_our_key_is_reported_once() -> None:
    core = linked(make_core("1"), "2")
    for round_ in range(6):
        version = core.self_record().version  # the twin answers each refutation
        core.receive(nid("2"), Records((record("1", version + 1, addrs=("10.9.9.9:1",)),)), 0.0)
        if round_ == 1:
            assert events(core) == []
    got = [e for e in events(core) if isinstance(e, DuplicateNodeDetected)]
    assert len(got) == 1 and got[0].node_id == nid("1") and "10.9.9.9:1" in got[0].detail


def test_digest_push_pull_sends_newer_records_and_wants_missing_ones() -> None:
    core = linked(make_core("1"), "2", "3")
    core.receive(nid("3"), Records((record("3", 2),)), 0.0)
    sent(core)
    their = {nid("1"): 1, nid("2"): 1, nid("3"): 1, nid("4"): 9}
    core.receive(nid("2"), Digest(their), 0.0)
    out = sent_to(core, nid("2"))
    assert out == [Records((core.records()[nid("3")],)), Want((nid("2"), nid("4")))]


def test_want_is_answered_with_the_known_records() -> None:
    core = linked(make_core("1"), "2")
    core.receive(nid("2"), Want((nid("1"), nid("9"))), 0.0)
    assert sent_to(core, nid("2")) == [Records((core.self_record(),))]


def test_a_round_is_one_root_summary_and_a_mismatch_narrows_to_one_bucket() -> None:
    a, b = make_core("1"), make_core("2")
    a.link_up(nid("2"), 0.0)
    b.link_up(nid("1"), 0.0)
    pump({nid("1"): a, nid("2"): b}, 0.0)
    a.tick(TIMINGS.gossip_interval_s)  # a gossip round: a root summary to b
    summary = [m for m in sent_to(a, nid("2")) if isinstance(m, Digest)]
    assert len(summary) == 1 and set(summary[0].versions) == {SUMMARY_KEY}
    b.receive(nid("1"), summary[0], 5.0)
    assert sent(b) == []  # same maps: nothing to say
    b.update_self(5.0, name="renamed")
    sent(b)  # the push is lost
    b.receive(nid("1"), summary[0], 5.0)
    buckets = sent_to(b, nid("1"))
    assert len(buckets) == 1 and isinstance(buckets[0], Digest) and len(buckets[0].versions) == 16
    a.receive(nid("2"), buckets[0], 5.0)
    listing = sent_to(a, nid("2"))
    assert listing == [listing_digest({nid("1"): 1, nid("2"): 1}, [bucket_of(nid("2"))])]
    b.receive(nid("1"), listing[0], 5.0)
    assert sent_to(b, nid("1")) == [Records((b.self_record(),))]


def test_update_self_bumps_the_version_and_pushes_to_every_link() -> None:
    core = linked(make_core("1"), "2", "3")
    new = core.update_self(1.0, name="gpu-box", vram_bytes=8 << 30)
    assert (new.version, new.name, new.vram_bytes) == (2, "gpu-box", 8 << 30)
    assert core.records()[nid("1")] == new == core.self_record()
    assert sorted(to for to, _ in sent(core)) == [nid("2"), nid("3")]
    assert core.update_self(1.0, name="gpu-box") is new  # no change, no new version
    assert sent(core) == []
    with pytest.raises(ValueError, match="node_id or version"):
        core.update_self(1.0, version=9)


def test_leave_tells_every_linked_peer_then_the_core_falls_silent() -> None:
    core = linked(make_core("1"), "2", "3")
    core.leave(1.0)
    assert sent(core) == [(nid("2"), Leaving(nid("1"))), (nid("3"), Leaving(nid("1")))]
    core.link_down(nid("2"), 1.1, "closed")  # the shell closes our links: no PeerDown gossip
    core.tick(2.0)
    assert sent(core) == []


def test_messages_not_for_the_core_and_from_unlinked_peers_are_ignored() -> None:
    core = linked(make_core("1"), "2")
    core.receive(nid("2"), Hello(1, nid("2"), "mesh", b"n"), 0.0)
    core.receive(nid("2"), RouteRequest(), 0.0)
    core.receive(nid("7"), Records((record("7"),)), 0.0)
    core.receive(nid("7"), Want((nid("1"),)), 0.0)
    assert sent(core) == [] and events(core) == []
    assert set(core.records()) == {nid("1")}


def test_outbox_and_events_are_drained() -> None:
    core = linked(make_core("1"), "2")
    core.receive(nid("2"), Records((record("2"),)), 0.0)
    assert events(core) != [] and events(core) == []
    core.update_self(0.0, name="x")
    assert core.outbox() != [] and core.outbox() == []


# -- dials ----------------------------------------------------------------------------------


def dials(core: MeshCore) -> list[str]:
    return [e.node_id for e in events(core) if isinstance(e, DialPeer)]


def test_the_lower_id_dials_at_once_and_once_per_backoff() -> None:
    core = make_core("1")
    linked(core, "0")
    core.receive(nid("0"), Records((record("5"),)), 0.0)
    got = events(core)
    assert DialPeer(nid("5"), record("5").addrs) in got
    for now in (0.5, 1.0, DIAL_BACKOFF_S - 0.01):
        core.tick(now)
        assert dials(core) == []
    core.tick(DIAL_BACKOFF_S)  # still no link: dial again
    assert dials(core) == [nid("5")]
    core.link_up(nid("5"), DIAL_BACKOFF_S + 0.1)
    core.tick(3 * DIAL_BACKOFF_S)
    assert dials(core) == []


def test_the_higher_id_waits_for_the_lower_to_dial() -> None:
    core = make_core("8")
    linked(core, "0")
    core.receive(nid("0"), Records((record("2"), record("3"))), 0.0)
    assert dials(core) == []
    deadline = core.next_deadline()
    assert deadline is not None and deadline <= DIAL_GRACE_S
    core.link_up(nid("2"), 1.0)  # "2" dialed us within the grace
    core.tick(DIAL_GRACE_S)
    assert dials(core) == [nid("3")]  # "3" did not: we dial it ourselves


def test_no_dial_beyond_max_direct_peers() -> None:
    timings = MeshTimings(max_direct_peers=3, suspect_after_s=30.0, dead_after_s=60.0)
    core = make_core("1", timings=timings)
    linked(core, "0")
    core.receive(nid("0"), Records(tuple(record(c) for c in "56789")), 0.0)
    assert dials(core) == [nid("5"), nid("6")]  # 1 link + 2 dials in flight = cap
    core.link_up(nid("5"), 0.1)
    core.link_up(nid("6"), 0.1)
    core.tick(5.5)
    assert dials(core) == []
    core.link_down(nid("6"), 5.6, "closed")
    assert dials(core) == [nid("7")]


def test_no_dial_to_dead_or_linked_nodes_or_nodes_without_address() -> None:
    core = linked(make_core("1"), "0", "5")
    core.receive(nid("0"), Records((record("5"), record("6", addrs=()))), 0.0)
    core.tick(20.0)
    assert dials(core) == []
