"""What the mesh core tells its shell: events (past tense) and commands (imperative).

Events report membership changes the rest of the node reacts to (planner, console, logs);
commands ask the shell to act on the network (dial a peer, close a link). Both come out of
`MeshCore.next_event()` in the order they happened. Pure data: imports nothing of the project
but the wire messages.
"""

from __future__ import annotations

from dataclasses import dataclass

from mesh_llm.wire.messages import NodeRecord


@dataclass(frozen=True, slots=True)
class PeerJoined:
    """A node's record was learned for the first time (directly or through gossip)."""

    node_id: str
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class PeerSuspected:
    """A linked peer has been silent for `suspect_after_s`."""

    node_id: str


@dataclass(frozen=True, slots=True)
class PeerRecovered:
    """A suspected peer was heard from again."""

    node_id: str


@dataclass(frozen=True, slots=True)
class PeerLost:
    """A node is dead (silence, closed link, or a verified notice); its record is gone."""

    node_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class PeerLeft:
    """A node left the mesh cleanly; its record is gone."""

    node_id: str


@dataclass(frozen=True, slots=True)
class RecordChanged:
    """A known node published a newer record."""

    node_id: str
    record: NodeRecord


@dataclass(frozen=True, slots=True)
class DuplicateNodeDetected:
    """Another live process uses this node's key (emitted once; the shell should stop one)."""

    node_id: str
    detail: str


@dataclass(frozen=True, slots=True)
class DialPeer:
    """Command: open a control link to `node_id` at one of `addrs` (then call `link_up`)."""

    node_id: str
    addrs: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class ClosePeer:
    """Command: close the link to `node_id` (the core already dropped it)."""

    node_id: str
    reason: str


MeshEvent = (
    PeerJoined
    | PeerSuspected
    | PeerRecovered
    | PeerLost
    | PeerLeft
    | RecordChanged
    | DuplicateNodeDetected
)
MeshCommand = DialPeer | ClosePeer
