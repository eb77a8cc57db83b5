"""The sans-I/O mesh core: gossip of node records, membership and liveness.

Inputs: `link_up`/`link_down` (an admitted control link to a peer appeared or closed),
`receive` (a control message from a linked peer), `report_failure` and `peer_refused` (death
hints: a failed request, a refused packet), `tick` (timers), `update_self`, `leave`.
Outputs: `outbox()` (messages to send, per peer), `next_event()` (events such as `PeerJoined`,
and the commands `DialPeer`/`ClosePeer`), `next_deadline()` (when `tick` must run next). The
shell drives it: after every input, drain events, send the outbox, re-arm one timer.

It is one class because every input touches records, links and timers together; its pure
decisions live in `gossip.py` (digests, RTT republishing) and `membership.py` (per-link
liveness and RTT, dial planning). Time (`now`, float seconds, monotonic) and randomness
(`random.Random`) are passed in. Imports no I/O, clock or concurrency module, and nothing of
the project outside core/ and wire/.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any, assert_never

from mesh_llm.core.events import (
    ClosePeer,
    DialPeer,
    DuplicateNodeDetected,
    MeshCommand,
    MeshEvent,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRecovered,
    PeerSuspected,
    RecordChanged,
)
from mesh_llm.core.gossip import (
    BUCKET_PREFIX,
    COVER_PREFIX,
    answer_digest,
    bucket_hashes,
    records_messages,
    root_digest,
    root_hash,
    rtt_changed,
)
from mesh_llm.core.membership import MIN_RTT_SAMPLES, DialPlanner, PeerLink, PeerState
from mesh_llm.wire.messages import (
    Digest,
    Hello,
    HelloFinish,
    HelloReply,
    HttpRequestHead,
    HttpResponseHead,
    Leaving,
    Message,
    NodeRecord,
    PeerDown,
    Ping,
    Pong,
    Records,
    Refused,
    RouteReply,
    RouteRequest,
    Want,
    Welcome,
)

DUPLICATE_CONFLICTS = 3
"""Conflicting records about ourselves before we call it a duplicate process, not a restart.

A restart meets the previous incarnation's record once or twice (stale copies of different
versions); another live process with our key answers every refutation with a new version.
"""


@dataclass(frozen=True, slots=True)
class MeshTimings:
    """Gossip and liveness parameters; all durations in seconds."""

    gossip_interval_s: float = 2.0
    gossip_fanout: int = 3
    heartbeat_interval_s: float = 1.0
    suspect_after_s: float = 3.0
    dead_after_s: float = 5.0
    probe_timeout_s: float = 3.0
    # Packets to a peer refused by its host (no process on the port): probe it this often, and
    # declare it dead after `refusals_to_die` refused probes within `refusal_window_s`.
    refusal_probe_interval_s: float = 0.25
    refusal_window_s: float = 1.5
    refusals_to_die: int = 3
    # A gap between two ticks longer than this many heartbeat intervals was a stall of this
    # node (its loop was blocked, or the machine suspended): not silence of its peers.
    stall_heartbeats: float = 2.0
    dead_ttl_s: float = 300.0
    max_direct_peers: int = 64
    rtt_republish_ratio: float = 0.25
    dial_backoff_s: float = 5.0  # at most one `DialPeer` per node this often while unlinked
    # The higher id of a pair waits this long for the lower id to dial before dialing itself.
    dial_grace_s: float = 2.0
    rtt_min_change_ms: float = 1.0  # RTT changes below this are never republished (LAN jitter)


MeshOutput = MeshEvent | MeshCommand
_RESERVED_PREFIXES = (BUCKET_PREFIX, COVER_PREFIX)  # digest keys, never node ids


# No machine has more: a record claiming more VRAM is capped here so that one liar cannot win
# every election or swallow every split (1 PiB).
MAX_VRAM_BYTES = 1 << 50


def _capped(record: NodeRecord) -> NodeRecord:
    """`record` with absurd claims brought back to plausible bounds."""
    if 0 <= record.vram_bytes <= MAX_VRAM_BYTES:
        return record
    return replace(record, vram_bytes=min(max(record.vram_bytes, 0), MAX_VRAM_BYTES))


def _advance(due: float, period: float, now: float) -> float:
    """The next period boundary after `due`, never in the past (no burst after a stall)."""
    due += period
    return due if due > now else now + period


class MeshCore:
    """Membership and gossip state of one node; see the module docstring for the protocol."""

    def __init__(
        self, self_record: NodeRecord, timings: MeshTimings, rng: random.Random, now: float
    ) -> None:
        self._timings = timings
        self._rng = rng
        self._self = self_record
        self._records: dict[str, NodeRecord] = {self_record.node_id: self_record}
        self._links: dict[str, PeerLink] = {}
        self._dead: dict[str, float] = {}  # node id -> when the entry expires
        self._dials = DialPlanner(self_record.node_id, timings.dial_grace_s, timings.dial_backoff_s)
        self._outbox: list[tuple[str, Message]] = []
        self._events: deque[MeshOutput] = deque()
        self._ping_seq = 0
        self._next_heartbeat: float | None = None
        self._next_gossip: float | None = None
        self._deadline: float | None = None  # never later than the earliest due timer
        self._last_tick: float | None = None
        self._buckets: list[int] | None = None  # cached bucket hashes of the version map
        self._self_conflicts = 0
        self._duplicate_reported = False
        self._left = False

    # -- queries -----------------------------------------------------------------------------

    @property
    def node_id(self) -> str:
        return self._self.node_id

    def self_record(self) -> NodeRecord:
        return self._self

    def records(self) -> Mapping[str, NodeRecord]:
        """A copy of every known live record, ours included, by node id."""
        return dict(self._records)

    def peer_state(self, peer: str) -> PeerState | None:
        """ALIVE/SUSPECT for a linked peer, ALIVE for a node known only through gossip."""
        link = self._links.get(peer)
        if link is not None:
            return link.state
        return PeerState.ALIVE if peer in self._records and peer != self.node_id else None

    def rtt_ms(self, peer: str) -> float | None:
        link = self._links.get(peer)
        return None if link is None else link.rtt_ms

    def linked_peers(self) -> set[str]:
        return set(self._links)

    def dead_peers(self) -> Mapping[str, float]:
        """Node ids whose records are ignored, with the time each entry expires."""
        return dict(self._dead)

    # -- outputs -----------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        """The earliest time `tick` must run (possibly early, never late), or None."""
        return self._deadline

    def outbox(self) -> list[tuple[str, Message]]:
        """Drain the queued (peer, message) pairs, in the order they were queued."""
        out, self._outbox = self._outbox, []
        return out

    def next_event(self) -> MeshOutput | None:
        return self._events.popleft() if self._events else None

    # -- inputs ------------------------------------------------------------------------------

    def link_up(self, peer: str, now: float) -> None:
        """An admitted control link to `peer` exists: forget it was dead, exchange digests."""
        if peer == self.node_id:
            return
        if self._dead.pop(peer, None) is not None:
            # A peer this node declared dead is linked again: a partition healed. Nodes of
            # the other side that this one buried come back only through gossip over this
            # link, so forget every dead mark (the peers of that side did not gossip the
            # nodes they buried themselves).
            self._dead.clear()
        self._dials.forget(peer)
        link = self._links.get(peer)
        if link is None:
            self._links[peer] = PeerLink(peer, last_heard=now)
        elif link.heard(now):
            self._events.append(PeerRecovered(peer))
        if self._next_heartbeat is None:
            self._next_heartbeat = now + self._timings.heartbeat_interval_s
            self._arm(self._next_heartbeat)
        if self._next_gossip is None:
            # A random phase keeps the rounds of nodes started together apart.
            self._next_gossip = now + self._rng.uniform(0.0, self._timings.gossip_interval_s)
            self._arm(self._next_gossip)
        self._send(peer, Digest(self._versions()))

    def link_down(self, peer: str, now: float, reason: str) -> None:
        """The link to `peer` closed: it is dead at once (no-op if the core already dropped it)."""
        if peer in self._links:
            self._declare_dead(peer, now, reason, close=False, notice=reason)
            self._after_input(now)

    def receive(self, peer: str, msg: Message, now: float) -> None:
        """A control message from linked `peer` (messages from unlinked peers are ignored)."""
        link = self._links.get(peer)
        if link is None:
            return
        if link.heard(now):
            self._events.append(PeerRecovered(peer))
        self._dispatch(peer, msg, now)
        self._after_input(now)

    def report_failure(self, peer: str, now: float) -> None:
        """On-use detection: a request to linked `peer` failed. Probe it directly now; with no
        answer within the probe timeout it is declared dead (as after a peer-down notice)."""
        link = self._links.get(peer)
        if link is None or link.probe_deadline is not None:
            return
        link.probe_deadline = now + self._timings.probe_timeout_s
        self._ping(peer, link, now)
        self._arm(link.probe_deadline)
        self._after_input(now)

    def peer_refused(self, peer: str, now: float) -> None:
        """A packet to linked `peer` came back refused: its host has no process on the port
        (ICMP port unreachable). A hint, not a verdict: probe it every refusal probe interval,
        and declare it dead only after `refusals_to_die` refusals within the refusal window
        with nothing heard from it meanwhile (any message from it clears them)."""
        link = self._links.get(peer)
        if link is None:
            return
        timings = self._timings
        count = link.refused(now, timings.refusal_probe_interval_s, timings.refusal_window_s)
        if count == 0:
            return
        if count >= timings.refusals_to_die:
            span = now - link.refusals[0]
            reason = f"{count} probes refused in {span:.1f} s (no process on its port)"
            self._declare_dead(peer, now, reason, close=True, notice=reason)
        elif link.refusal_probe_at is None:
            link.refusal_probe_at = now + timings.refusal_probe_interval_s
            self._arm(link.refusal_probe_at)
        self._after_input(now)

    def tick(self, now: float) -> None:
        """Run every timer due at `now`: expiries, liveness, heartbeat, gossip, dials."""
        self._dead = {node: until for node, until in self._dead.items() if until > now}
        self._forgive_stall(now)
        self._check_liveness(now)
        if not self._links:
            self._next_heartbeat = self._next_gossip = None
        if self._next_heartbeat is not None and now >= self._next_heartbeat:
            self._heartbeat(now)
        if self._next_gossip is not None and now >= self._next_gossip:
            self._gossip_round(now)
        self._run_dials(now)
        self._deadline = self._compute_deadline(now)

    def update_self(self, now: float, **changes: object) -> NodeRecord:
        """Change our record (bumping its version) and push it to every linked peer."""
        if "node_id" in changes or "version" in changes:
            raise ValueError("update_self cannot change node_id or version")
        fields: dict[str, Any] = dict(changes)  # checked by the codec when it is sent
        updated = replace(self._self, **fields)
        if updated != self._self:
            self._publish(replace(updated, version=self._self.version + 1))
        return self._self

    def leave(self, now: float) -> None:
        """Tell every linked peer we leave the mesh; after this the core sends nothing more.

        The shell closes the links next: their `link_down`s must not gossip `PeerDown` notices
        about peers that are alive.
        """
        self._broadcast(Leaving(self.node_id))
        self._left = True

    # -- dispatch ----------------------------------------------------------------------------

    def _dispatch(self, peer: str, msg: Message, now: float) -> None:
        match msg:
            case Digest():
                self._on_digest(peer, msg)
            case Records():
                self._on_records(peer, msg, now)
            case Want():
                self._on_want(peer, msg)
            case Ping():
                self._links[peer].peer_pinged_at = now
                self._send(peer, Pong(msg.seq))
            case Pong():
                self._links[peer].pong_received(msg.seq, now)
            case PeerDown():
                self._on_peer_down(peer, msg, now)
            case Leaving():
                self._on_leaving(peer, msg, now)
            case (
                Hello()
                | HelloReply()
                | HelloFinish()
                | Welcome()
                | Refused()
                | RouteRequest()
                | RouteReply()
                | HttpRequestHead()
                | HttpResponseHead()
            ):
                pass  # admission, passive-client routes and API streams belong to the shell
            case _:
                assert_never(msg)

    def _on_digest(self, peer: str, msg: Digest) -> None:
        answer = answer_digest(msg, self._versions(), self._bucket_hashes(), self._dead)
        if answer.reply is not None:
            self._send(peer, answer.reply)
        self._send_records(peer, (self._records[node_id] for node_id in answer.push))
        if answer.want:
            self._send(peer, Want(answer.want))

    def _on_records(self, sender: str, msg: Records, now: float) -> None:
        for record in msg.records:
            if record.node_id == self.node_id:
                self._on_own_record(record)
            elif record.node_id != sender and record.node_id in self._links:
                # A node we are linked with is the authority on its own record: a newer copy
                # from anyone else (a relay after a lost push, or a forgery) is not stored but
                # makes us ask the node itself.
                current = self._records.get(record.node_id)
                if current is None or record.version > current.version:
                    self._send(record.node_id, Want((record.node_id,)))
            else:
                self._accept(_capped(record), now)

    def _on_want(self, peer: str, msg: Want) -> None:
        wanted = (self._records.get(node_id) for node_id in msg.node_ids)
        self._send_records(peer, (record for record in wanted if record is not None))

    def _on_peer_down(self, sender: str, msg: PeerDown, now: float) -> None:
        node_id = msg.node_id
        if node_id in (self.node_id, sender) or node_id in self._dead:
            return
        link = self._links.get(node_id)
        if link is not None and now - link.last_heard < self._timings.suspect_after_s:
            # We still hear from it: believe the notice only if a direct probe goes unanswered.
            if link.probe_deadline is None:
                link.probe_deadline = now + self._timings.probe_timeout_s
                self._ping(node_id, link, now)
                self._arm(link.probe_deadline)
            return
        reason = f"reported down by {sender[:10]}" + (f": {msg.reason}" if msg.reason else "")
        self._declare_dead(node_id, now, reason, close=True, notice=msg.reason, skip=sender)

    def _on_leaving(self, sender: str, msg: Leaving, now: float) -> None:
        node_id = msg.node_id
        if node_id == self.node_id or node_id in self._dead:
            return
        if node_id != sender and node_id in self._links:
            return  # a leaver tells its linked peers itself; a relayed copy is not trusted
        link = self._links.pop(node_id, None)
        record = self._forget(node_id, now)
        if link is None and record is None:
            return
        self._events.append(PeerLeft(node_id))
        if link is not None:
            self._events.append(ClosePeer(node_id, "left the mesh"))
        self._broadcast(msg, skip=sender)

    # -- records -----------------------------------------------------------------------------

    def _accept(self, record: NodeRecord, now: float) -> None:
        """Store `record` if it is newer and not of a dead node; plan a dial to a new node."""
        node_id = record.node_id
        if node_id in self._dead or not node_id or node_id.startswith(_RESERVED_PREFIXES):
            return
        current = self._records.get(node_id)
        if current is not None and record.version <= current.version:
            return
        self._records[node_id] = record
        self._buckets = None
        self._events.append(
            PeerJoined(node_id, record) if current is None else RecordChanged(node_id, record)
        )
        if node_id not in self._links and record.addrs:
            self._dials.want(node_id, now)

    def _on_own_record(self, record: NodeRecord) -> None:
        """A record about us at least as new as ours: refute it with a higher version."""
        own = self._self
        if record.version < own.version or record == own:
            return
        if (record.name, record.addrs) != (own.name, own.addrs):
            self._self_conflicts += 1
            if self._self_conflicts >= DUPLICATE_CONFLICTS and not self._duplicate_reported:
                self._duplicate_reported = True
                detail = (
                    f"another process publishes this node's records (version {record.version}, "
                    f"name {record.name!r}, addrs {list(record.addrs)}); this one is "
                    f"{own.name!r} at {list(own.addrs)}: stop one of them"
                )
                self._events.append(DuplicateNodeDetected(self.node_id, detail))
        if not self._duplicate_reported:  # no endless version war with a twin
            self._publish(replace(own, version=record.version + 1))

    def _publish(self, record: NodeRecord) -> None:
        self._self = record
        self._records[record.node_id] = record
        self._buckets = None
        self._broadcast(Records((record,)))

    def _forget(self, node_id: str, now: float) -> NodeRecord | None:
        """Drop a node's record and dial plan, and ignore its records for `dead_ttl_s`."""
        self._dead[node_id] = now + self._timings.dead_ttl_s
        self._arm(self._dead[node_id])
        self._dials.forget(node_id)
        record = self._records.pop(node_id, None)
        if record is not None:
            self._buckets = None
        return record

    def _declare_dead(
        self, node_id: str, now: float, reason: str, *, close: bool, notice: str, skip: str = ""
    ) -> None:
        """Drop a node: PeerLost, ClosePeer if linked and `close`, PeerDown to the others."""
        link = self._links.pop(node_id, None)
        record = self._forget(node_id, now)
        if link is None and record is None:
            return
        self._events.append(PeerLost(node_id, reason))
        if link is not None and close:
            self._events.append(ClosePeer(node_id, reason))
        self._broadcast(PeerDown(node_id, notice), skip=skip)

    def _versions(self) -> dict[str, int]:
        return {node_id: record.version for node_id, record in self._records.items()}

    def _bucket_hashes(self) -> list[int]:
        if self._buckets is None:
            self._buckets = bucket_hashes(self._versions())
        return self._buckets

    def _root_hash(self) -> int:
        return root_hash(self._bucket_hashes())

    # -- timers ------------------------------------------------------------------------------

    def _forgive_stall(self, now: float) -> None:
        """Links tick at least every heartbeat interval; a much longer gap since the previous
        tick means this node was stalled, and its peers' silence during it is not theirs."""
        interval = self._timings.heartbeat_interval_s
        previous, self._last_tick = self._last_tick, now
        if previous is None or now - previous <= self._timings.stall_heartbeats * interval:
            return
        for link in self._links.values():
            link.forgive_stall(now - previous - interval, now)

    def _check_liveness(self, now: float) -> None:
        timings = self._timings
        for peer, link in list(self._links.items()):
            if link.refusal_probe_at is not None and now >= link.refusal_probe_at:
                link.refusal_probe_at = None
                self._ping(peer, link, now)
            silence = now - link.last_heard
            if silence >= timings.dead_after_s:
                reason = f"silent for {silence:.1f} s"
                self._declare_dead(peer, now, reason, close=True, notice=reason)
            elif link.probe_deadline is not None and now >= link.probe_deadline:
                reason = "no answer to a probe after a peer-down notice"
                self._declare_dead(peer, now, reason, close=True, notice=reason)
            elif silence >= timings.suspect_after_s and not link.suspect:
                link.suspect = True
                self._events.append(PeerSuspected(peer))

    def _heartbeat(self, now: float) -> None:
        interval = self._timings.heartbeat_interval_s
        for peer, link in self._links.items():
            if link.needs_heartbeat(now, interval):
                self._ping(peer, link, now)
        assert self._next_heartbeat is not None
        self._next_heartbeat = _advance(
            self._next_heartbeat, self._timings.heartbeat_interval_s, now
        )

    def _gossip_round(self, now: float) -> None:
        self._republish_rtt()
        peers = list(self._links)
        digest = root_digest(self._root_hash())
        for peer in self._rng.sample(peers, min(self._timings.gossip_fanout, len(peers))):
            self._send(peer, digest)
        assert self._next_gossip is not None
        self._next_gossip = _advance(self._next_gossip, self._timings.gossip_interval_s, now)

    def _republish_rtt(self) -> None:
        measured = {
            peer: (round(link.rtt_ms, 2), link.rtt_noise_ms)
            for peer, link in self._links.items()
            if link.rtt_ms is not None and link.rtt_samples >= MIN_RTT_SAMPLES
        }
        ratio = self._timings.rtt_republish_ratio
        if rtt_changed(self._self.rtt_ms, measured, ratio, self._timings.rtt_min_change_ms):
            rtt_ms = {peer: rtt for peer, (rtt, _) in measured.items()}
            self._publish(replace(self._self, rtt_ms=rtt_ms, version=self._self.version + 1))

    def _run_dials(self, now: float) -> None:
        free_slots = self._timings.max_direct_peers - len(self._links)
        for node_id in self._dials.take_due(now, free_slots):
            self._events.append(DialPeer(node_id, self._records[node_id].addrs))
        next_due = self._dials.next_due(now)
        if next_due is not None:
            self._arm(next_due)

    def _compute_deadline(self, now: float) -> float | None:
        timings = self._timings
        due: list[float] = list(self._dead.values())
        if self._next_heartbeat is not None:
            due.append(self._next_heartbeat)
        if self._next_gossip is not None:
            due.append(self._next_gossip)
        due.extend(
            link.next_liveness_deadline(timings.suspect_after_s, timings.dead_after_s)
            for link in self._links.values()
        )
        next_dial = self._dials.next_due(now)
        if next_dial is not None and len(self._links) < timings.max_direct_peers:
            due.append(next_dial)
        return min(due, default=None)

    def _arm(self, due: float) -> None:
        if self._deadline is None or due < self._deadline:
            self._deadline = due

    def _after_input(self, now: float) -> None:
        if self._dials.dirty:
            self._run_dials(now)

    # -- sending -----------------------------------------------------------------------------

    def _ping(self, peer: str, link: PeerLink, now: float) -> None:
        self._ping_seq += 1
        link.ping_sent(self._ping_seq, now)
        self._send(peer, Ping(self._ping_seq))

    def _send(self, peer: str, msg: Message) -> None:
        if not self._left:
            self._outbox.append((peer, msg))

    def _send_records(self, peer: str, records: Iterable[NodeRecord]) -> None:
        for msg in records_messages(records):
            self._send(peer, msg)

    def _broadcast(self, msg: Message, skip: str = "") -> None:
        for peer in self._links:
            if peer != skip:
                self._send(peer, msg)
