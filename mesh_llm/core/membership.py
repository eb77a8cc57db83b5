"""Per-peer state of the mesh core: one admitted control link, its liveness and its RTT.

`PeerLink` records when a peer was last heard from, whether it is suspect, an outstanding
verification probe, and a bounded map of unanswered ping sequence numbers from which it derives
a smoothed round-trip time. `DialPlanner` decides which known nodes to dial, and when. Inputs are
times (`now`, float seconds, monotonic) passed in; no I/O module is imported, no clock read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum

MAX_PENDING_PINGS = 8
"""Unanswered pings remembered per peer; older ones are forgotten (their pongs are ignored)."""
RTT_SMOOTHING = 1 / 32
"""Weight of a new RTT sample once warmed up (before: the plain mean of the samples so far).

Heavy smoothing keeps the published RTT still under jitter, so gossip stays quiet at steady
state, while a real change of path still moves the estimate by 25 % within seconds.
"""
MIN_RTT_SAMPLES = 16
"""Samples needed before a peer's RTT is published in our record (16 s at one ping a second).

Publishing a mean of a few samples makes every node republish its record soon after, once the
mean has moved: at 200 nodes that wave costs more than all the heartbeats.
"""

HEARTBEAT_RTT_EVERY = 4
"""A peer that pings us needs no ping back for liveness; every this many heartbeats we ping it
anyway, so both ends keep measuring RTT (the roles then swap: about one ping per link and
heartbeat instead of two)."""


class PeerState(StrEnum):
    ALIVE = "alive"
    SUSPECT = "suspect"


@dataclass(slots=True)
class PeerLink:
    """An admitted control link to a peer, from `link_up` to its death."""

    peer: str
    last_heard: float
    suspect: bool = False
    probe_deadline: float | None = None
    rtt_ms: float | None = None
    rtt_samples: int = 0
    rtt_var_ms2: float = 0.0  # smoothed variance of the samples
    pings: dict[int, float] = field(default_factory=dict)
    peer_pinged_at: float | None = None
    """When the peer's last `Ping` arrived: its heartbeat keeps both ends hearing each other."""
    skipped: int = 0
    """Heartbeats in a row we sent this peer no ping (it was pinging us)."""
    refusals: list[float] = field(default_factory=list)
    """When packets to the peer were refused (ICMP port unreachable) since it was last heard,
    at most one per probe interval: a process death hint that probes confirm."""
    refusal_probe_at: float | None = None

    @property
    def state(self) -> PeerState:
        return PeerState.SUSPECT if self.suspect else PeerState.ALIVE

    def heard(self, now: float) -> bool:
        """Note any message from the peer; True if it was suspect (it has recovered)."""
        self.last_heard = max(self.last_heard, now)
        self.probe_deadline = None
        self.refusals.clear()
        self.refusal_probe_at = None
        recovered, self.suspect = self.suspect, False
        return recovered

    def needs_heartbeat(self, now: float, interval_s: float) -> bool:
        """Whether this heartbeat pings the peer: not if it pinged us within the last
        interval (its ping and our pong already carry liveness both ways), unless we skipped
        `HEARTBEAT_RTT_EVERY - 1` in a row. A skip counts as one; a ping resets the count."""
        pinged_us = self.peer_pinged_at is not None and now - self.peer_pinged_at < interval_s
        if pinged_us and self.skipped < HEARTBEAT_RTT_EVERY - 1:
            self.skipped += 1
            return False
        return True

    def ping_sent(self, seq: int, now: float) -> None:
        self.skipped = 0
        self.pings[seq] = now
        while len(self.pings) > MAX_PENDING_PINGS:
            del self.pings[next(iter(self.pings))]

    def pong_received(self, seq: int, now: float) -> None:
        """Fold the round trip of ping `seq` into the smoothed RTT (unknown seqs are ignored)."""
        sent = self.pings.pop(seq, None)
        if sent is None:
            return
        sample = max(0.0, (now - sent) * 1000.0)
        self.rtt_samples += 1
        if self.rtt_ms is None:
            self.rtt_ms = sample
            return
        weight = self._weight()
        deviation = sample - self.rtt_ms
        self.rtt_ms += weight * deviation
        self.rtt_var_ms2 += weight * (deviation * deviation * (1.0 - weight) - self.rtt_var_ms2)

    @property
    def rtt_noise_ms(self) -> float:
        """The standard error of `rtt_ms` from the jitter seen so far (ms)."""
        return math.sqrt(self.rtt_var_ms2 * self._weight())

    def _weight(self) -> float:
        return max(1.0 / max(self.rtt_samples, 1), RTT_SMOOTHING)

    def refused(self, now: float, probe_interval_s: float, window_s: float) -> int:
        """Note a refused packet; the refusals counted within `window_s` (0: not counted).

        Every packet sent to a dead port comes back refused, so a burst of them (a ping, its
        retransmission, an ACK) counts once: a refusal counts only `probe_interval_s` / 2 after
        the previous one, so a verdict needs refusals of separate probes.
        """
        if self.refusals and now - self.refusals[-1] < probe_interval_s / 2:
            return 0
        self.refusals = [at for at in self.refusals if now - at <= window_s]
        self.refusals.append(now)
        return len(self.refusals)

    def forgive_stall(self, stall_s: float, now: float) -> None:
        """This node itself was stalled for `stall_s` (it could hear nothing): that time is
        not the peer's silence."""
        self.last_heard = min(now, self.last_heard + stall_s)
        if self.probe_deadline is not None:
            self.probe_deadline += stall_s

    def next_liveness_deadline(self, suspect_after_s: float, dead_after_s: float) -> float:
        """When this link's next silence transition or probe deadline falls due."""
        due = self.last_heard + (dead_after_s if self.suspect else suspect_after_s)
        for deadline in (self.probe_deadline, self.refusal_probe_at):
            if deadline is not None:
                due = min(due, deadline)
        return due


@dataclass(slots=True)
class DialState:
    """A node we know of but have no link to: when we may dial it next."""

    due: float
    dialed_at: float | None = None

    def in_flight(self, now: float, backoff_s: float) -> bool:
        return self.dialed_at is not None and now < self.dialed_at + backoff_s


class DialPlanner:
    """Which known nodes without a link to dial, and when: at most once per `backoff_s`.

    Of two nodes that learn of each other, the lower id dials at once and the higher one only
    after `grace_s` without a link, so both rarely dial at the same time. Dials in flight count
    against the free link slots, so a burst of new records cannot overshoot the peer cap.
    """

    def __init__(self, self_id: str, grace_s: float, backoff_s: float) -> None:
        self._self_id = self_id
        self._grace_s = grace_s
        self._backoff_s = backoff_s
        self._dials: dict[str, DialState] = {}
        self.dirty = False  # something changed that may make a dial due now

    def want(self, node_id: str, now: float) -> None:
        if node_id not in self._dials:
            grace = 0.0 if self._self_id < node_id else self._grace_s
            self._dials[node_id] = DialState(due=now + grace)
            self.dirty = True

    def forget(self, node_id: str) -> None:
        """No dial to `node_id` any more (it linked, died or left); a slot may have freed."""
        self._dials.pop(node_id, None)
        self.dirty = True

    def __contains__(self, node_id: str) -> bool:
        return node_id in self._dials

    def take_due(self, now: float, free_slots: int) -> list[str]:
        """The nodes to dial now, marked as dialed, within the free slots."""
        self.dirty = False
        free_slots -= sum(dial.in_flight(now, self._backoff_s) for dial in self._dials.values())
        due: list[str] = []
        for node_id, dial in self._dials.items():
            if len(due) >= free_slots:
                break
            if dial.due <= now:
                dial.dialed_at, dial.due = now, now + self._backoff_s
                due.append(node_id)
        return due

    def next_due(self, now: float) -> float | None:
        """The next time a dial falls due; dials already due wait for a free slot instead."""
        return min((dial.due for dial in self._dials.values() if dial.due > now), default=None)
