"""The status document of a node: `/api/status`, `mesh-llm status` and the console's view.

`status_document` assembles plain data from the node's parts — its identity and role, its
hardware and llama.cpp build, the models it knows (`model_statuses`), its peers (the peer
manager's snapshot), the fast lane, the RPC tunnels and the HTTP lanes to other hosts (each
lane choice with its reason), the gossip records as advertised, and the split it hosts.
Pure: reads no clock and does no I/O.
"""

from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mesh_llm import __version__
from mesh_llm.api.console_view import record_fields
from mesh_llm.backend.build import Binaries
from mesh_llm.backend.hardware import HardwareInfo
from mesh_llm.config import Config
from mesh_llm.core.planner import GroupPlan
from mesh_llm.core.router import ModelStatus
from mesh_llm.wire.messages import NodeRecord


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What a node knows of itself when asked for its status."""

    node_id: str
    short_id: str
    role: str
    api_url: str
    mesh_port: int | None
    hardware: HardwareInfo | None
    binaries: Binaries | None
    draining: bool
    token: str | None


def status_document(
    config: Config,
    facts: NodeFacts,
    statuses: Sequence[ModelStatus],
    records: Sequence[NodeRecord],
    peers: dict[str, Any],
    lanes: dict[str, Any],
    plan: GroupPlan | None,
) -> dict[str, Any]:
    """The document; `peers` is the peer manager's snapshot, `lanes` holds `fast_lane_port`,
    `rpc_tunnels` and `api_lanes`."""
    hardware, binaries = facts.hardware, facts.binaries
    return {
        "node": {
            "node_id": facts.node_id,
            "short_id": facts.short_id,
            "name": socket.gethostname(),
            "role": facts.role,
            "client": config.client,
            "api_url": facts.api_url,
            "mesh_port": facts.mesh_port,
            "vram_bytes": hardware.vram_bytes if hardware else 0,
            "backend": hardware.backend if hardware else "",
            "build_id": binaries.build_id if binaries else "",
            "rpc_protocol": binaries.rpc_protocol if binaries else "",
            "version": __version__,
            "draining": facts.draining,
        },
        "token": facts.token,
        "is_host": is_host(facts.node_id, records),
        "models": [
            {
                "name": m.name,
                "state": m.state.value,
                "reason": m.reason,
                "host": m.host,
                "nodes": m.node_count,
                "remote_hosts": list(m.remote),
            }
            for m in statuses
        ],
        "peers": peers["peers"],
        "clients": peers["clients"],
        **lanes,
        # For the console's view: every gossip record as advertised, the context size,
        # and the split this node hosts (if any).
        "records": [record_fields(r) for r in records],
        "ctx_size": config.backend.ctx_size,
        "split": split_status(plan),
    }


def is_host(node_id: str, records: Sequence[NodeRecord]) -> bool:
    """The node hosts a model (solo or a split) in its own published serving map."""
    own = next((r for r in records if r.node_id == node_id), None)
    return own is not None and any(
        info.role == "host" and info.host == own.node_id for info in own.serving.values()
    )


def split_status(plan: GroupPlan | None) -> dict[str, Any] | None:
    if plan is None or not plan.workers:
        return None
    return {"model": plan.model, "host": plan.host, "tensor_split": list(plan.tensor_split)}
