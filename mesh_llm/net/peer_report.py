"""What the mesh shell tells people: a log line per membership event, a status row per peer.

`log_mesh_event` logs the core's membership events (joined, suspect, alive again, dead, left,
a duplicate of this node's key) with their `event` names for the JSON log; `member_row` and
`route_row` are the peer rows of `/api/status` and `mesh-llm status` for a member (gossip
state, link, RTT) and for a passive client (the routing table).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any, assert_never

from mesh_llm.core.events import (
    DuplicateNodeDetected,
    MeshEvent,
    PeerJoined,
    PeerLeft,
    PeerLost,
    PeerRecovered,
    PeerSuspected,
    RecordChanged,
)
from mesh_llm.core.mesh import MeshCore
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.net.incoming import format_addr
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.wire.messages import NodeRecord

log = logging.getLogger("mesh_llm.net.peers")  # the logger these lines always had


def member_row(
    core: MeshCore, node_id: NodeId, record: NodeRecord, link: QuicPeerConnection | None
) -> dict[str, Any]:
    """A peer of a member: its gossip state, whether it is linked, where, its RTT."""
    return {
        "node_id": node_id,
        "short_id": short_id(node_id),
        "state": core.peer_state(node_id) or "known",
        "linked": link is not None,
        "address": format_addr(link.remote_addr) if link is not None else None,
        "rtt_ms": core.rtt_ms(node_id),
        "record": record_dict(record),
    }


def route_row(record: NodeRecord, linked: bool) -> dict[str, Any]:
    """A serving node in a passive client's routing table."""
    return {
        "node_id": record.node_id,
        "short_id": short_id(NodeId(record.node_id)),
        "state": "route",
        "linked": linked,
        "address": None,
        "rtt_ms": None,
        "record": record_dict(record),
    }


def log_mesh_event(event: MeshEvent) -> None:
    """One log line for a membership event of the core."""
    match event:
        case PeerJoined(node_id=node_id):
            _log_peer(logging.INFO, "peer %s joined", node_id, "peer_joined")
        case PeerSuspected(node_id=node_id):
            _log_peer(logging.WARNING, "peer %s is suspect (silent)", node_id, "peer_suspect")
        case PeerRecovered(node_id=node_id):
            _log_peer(logging.INFO, "peer %s is alive again", node_id, "peer_recovered")
        case PeerLost(node_id=node_id, reason=reason):
            _log_peer(logging.WARNING, "peer %s is dead: %s", node_id, "peer_dead", reason)
        case PeerLeft(node_id=node_id):
            _log_peer(logging.INFO, "peer %s left", node_id, "peer_left")
        case RecordChanged(node_id=node_id):
            log.debug("record of %s changed", short_id(NodeId(node_id)))
        case DuplicateNodeDetected(node_id=node_id, detail=detail):
            log.error(
                "another process uses this node's key (%s): %s — give each node its own "
                "~/.mesh-llm or MESH_LLM_EPHEMERAL_KEY=1",
                short_id(NodeId(node_id)),
                detail,
                extra={"event": "duplicate_node"},
            )
        case _:
            assert_never(event)


def _log_peer(level: int, message: str, node_id: str, event: str, *args: object) -> None:
    peer = short_id(NodeId(node_id))
    log.log(level, message, peer, *args, extra={"event": event, "peer": node_id})


def record_dict(record: NodeRecord) -> Mapping[str, Any]:
    return {
        "name": record.name,
        "version": record.version,
        "addrs": list(record.addrs),
        "role": record.role,
        "vram_bytes": record.vram_bytes,
        "backend": record.backend,
        "build_id": record.build_id,
        "rpc_protocol": record.rpc_protocol,
        "models_on_disk": dict(record.models_on_disk),
        "requested_models": list(record.requested_models),
        "serving": {
            m: {"role": s.role, "ready": s.ready, "host": s.host} for m, s in record.serving.items()
        },
        "api_port": record.api_port,
        "fast_lane_port": record.fast_lane_port,
        "software_version": record.software_version,
        "demand": dict(record.demand),
    }
