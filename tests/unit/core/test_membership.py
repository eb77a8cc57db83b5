"""Per-link state: bounded ping memory, RTT mean and noise, dial planning."""

from __future__ import annotations

import random

import pytest

from mesh_llm.core.membership import MAX_PENDING_PINGS, DialPlanner, PeerLink, PeerState


def test_unanswered_pings_are_bounded() -> None:
    link = PeerLink("p", last_heard=0.0)
    for seq in range(100):
        link.ping_sent(seq, float(seq))
    assert list(link.pings) == list(range(100 - MAX_PENDING_PINGS, 100))
    link.pong_received(3, 200.0)  # forgotten: no absurd 197 s sample
    assert link.rtt_ms is None
    link.pong_received(99, 99.010)
    assert link.rtt_ms == pytest.approx(10.0)
    assert 99 not in link.pings


def test_rtt_is_the_mean_of_samples_and_noise_shrinks_with_them() -> None:
    rng = random.Random(1)
    link = PeerLink("p", last_heard=0.0)
    noise = []
    for seq in range(200):
        link.ping_sent(seq, float(seq))
        link.pong_received(seq, seq + rng.uniform(0.010, 0.030))
        noise.append(link.rtt_noise_ms)
    assert link.rtt_ms == pytest.approx(20.0, abs=1.5)
    assert noise[10] > noise[-1] > 0.0
    assert link.rtt_samples == 200


def test_hearing_a_suspect_peer_recovers_it_and_clears_a_probe() -> None:
    link = PeerLink("p", last_heard=0.0, suspect=True, probe_deadline=5.0)
    assert link.state is PeerState.SUSPECT
    assert link.heard(3.0) is True
    assert (link.state, link.probe_deadline, link.last_heard) == (PeerState.ALIVE, None, 3.0)
    assert link.heard(2.0) is False and link.last_heard == 3.0  # never goes back in time


def test_dial_planner_lower_id_first_backoff_and_slots() -> None:
    planner = DialPlanner("5", grace_s=2.0, backoff_s=5.0)
    for node in ("7", "8", "9", "1"):
        planner.want(node, 0.0)
    assert planner.take_due(0.0, free_slots=2) == ["7", "8"]
    assert planner.take_due(0.0, free_slots=2) == []  # two dials in flight fill the slots
    assert planner.next_due(0.0) == 2.0  # "1" is lower: it gets 2 s to dial us first
    planner.forget("7")  # linked
    assert planner.take_due(2.0, free_slots=2) == ["9"]  # "8" is still in flight
    assert planner.take_due(5.0, free_slots=3) == ["8", "1"]  # "8" again after its backoff
    assert "7" not in planner and "8" in planner
