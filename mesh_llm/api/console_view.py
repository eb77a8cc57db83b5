"""What the console page draws, computed from a node's status (pure: no I/O, no clock).

Input: the `/api/status` document of a node (its own fields, the gossip records it holds, its
peers' liveness, its tunnels and lanes). Output: `console_view(status)`, plain JSON data — one
card per mesh node (role, models, VRAM as advertised in gossip and its share of the mesh's
advertised total), links with RTT, what flows on them and on which lane, split groups, models
warm/cold, and one status line. Clients are listed apart and never counted in mesh VRAM. Every
number shown is one a node advertised; shares are of the sum of exactly those numbers, so they
add up to 100 %.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from mesh_llm.core.types import NodeId, short_id
from mesh_llm.wire.messages import NodeRecord

GONE_STATES = frozenset({"dead", "left"})
_QUANT = re.compile(r"(?i)(?:^|[-_.])((?:i?q\d+(?:_[a-z0-9]+)*)|f16|bf16|f32)(?:[-_.]|$)")

Json = dict[str, Any]


def record_fields(record: NodeRecord) -> Json:
    """A gossip record as plain data (what every node advertises about itself)."""
    return {
        "node_id": record.node_id,
        "name": record.name,
        "role": record.role,
        "vram_bytes": record.vram_bytes,
        "backend": record.backend,
        "build_id": record.build_id,
        "models_on_disk": dict(record.models_on_disk),
        "requested_models": list(record.requested_models),
        "serving": {
            model: {"role": info.role, "ready": info.ready, "host": info.host}
            for model, info in record.serving.items()
        },
        "rtt_ms": dict(record.rtt_ms),
        "fast_lane_port": record.fast_lane_port,
        "software_version": record.software_version,
    }


def quant_of(model: str) -> str:
    """The quantisation named in a model (file) name, e.g. "Q4_K_M", or ""."""
    found = _QUANT.search(model.removesuffix(".gguf"))
    return found.group(1).upper() if found else ""


def console_view(status: Mapping[str, Any]) -> Json:
    """The page's data for one status document; see the module docstring."""
    me = status.get("node", {})
    self_id = me.get("node_id", "")
    states = {p["node_id"]: p.get("state", "known") for p in status.get("peers", [])}
    records = {
        r["node_id"]: r
        for r in status.get("records", [])
        if r["node_id"] == self_id or states.get(r["node_id"], "known") not in GONE_STATES
    }
    members = [r for r in records.values() if r.get("role") != "client"]
    mesh_vram = sum(int(r.get("vram_bytes", 0)) for r in members)
    nodes = [_node_card(r, self_id, states, mesh_vram) for r in members]
    nodes.sort(key=lambda n: (not n["you"], n["node_id"]))
    if me.get("client"):
        you = {
            "node_id": self_id,
            "short_id": me.get("short_id", ""),
            "you": True,
            "name": me.get("name", ""),
            "role": "client",
            "backend": "API only",
        }
        clients: Json = {"count": 1, "you": you}
    else:
        clients = {"count": int(status.get("clients", 0)), "you": None}
    return {
        "self_id": self_id,
        "nodes": nodes,
        "clients": clients,
        "mesh_vram_bytes": mesh_vram,
        "links": _links(members, status),
        "groups": _groups(members, status),
        "models": _models(status, records),
        "status_line": _status_line(status, len(nodes), mesh_vram),
    }


def _node_card(record: Json, self_id: str, states: Mapping[str, str], mesh_vram: int) -> Json:
    serving: Mapping[str, Json] = record.get("serving", {})
    roles = {info["role"] for info in serving.values()}
    if roles & {"host", "loading"}:
        role, backend = "host", "llama-server"
    elif "worker" in roles:
        role, backend = "rpc worker", "rpc-server"
    else:
        role, backend = "standby", "none"
    vram = int(record.get("vram_bytes", 0))
    node_id = record["node_id"]
    return {
        "node_id": node_id,
        "short_id": node_id[:10],
        "you": node_id == self_id,
        "name": record.get("name", ""),
        "role": role,
        "state": "alive" if node_id == self_id else states.get(node_id, "known"),
        "models": [
            {"name": model, "role": info["role"], "ready": bool(info["ready"])}
            for model, info in sorted(serving.items())
        ],
        "vram_bytes": vram,
        "vram_share": vram / mesh_vram if mesh_vram else 0.0,
        "backend": backend,
        "hardware": record.get("backend", ""),
        "build_id": record.get("build_id", ""),
        "version": record.get("software_version", ""),
    }


def _workers_of(members: Sequence[Json]) -> dict[tuple[str, str], list[str]]:
    """(host, model) → the rpc workers in that host's split."""
    groups: dict[tuple[str, str], list[str]] = {}
    for record in members:
        for model, info in record.get("serving", {}).items():
            if info["role"] == "worker" and info.get("host"):
                groups.setdefault((info["host"], model), []).append(record["node_id"])
    return groups


def _links(members: Sequence[Json], status: Mapping[str, Any]) -> list[Json]:
    """One link per pair of members that measured an RTT to each other (either side)."""
    by_id = {r["node_id"]: r for r in members}
    hosts = {
        r["node_id"]
        for r in members
        if any(i["role"] in ("host", "loading") for i in r.get("serving", {}).values())
    }
    rpc_pairs = {frozenset((h, w)) for (h, _), ws in _workers_of(members).items() for w in ws}
    self_id = status.get("node", {}).get("node_id", "")
    own_rtt = {p["node_id"]: p.get("rtt_ms") for p in status.get("peers", [])}
    quic_for_now = set((status.get("api_lanes") or {}).get("quic_for_now", []))
    tunnel_lanes = {t["worker"]: t.get("lane", "fast") for t in status.get("rpc_tunnels", [])}
    links: list[Json] = []
    ids = sorted(by_id)
    for index, a in enumerate(ids):
        for b in ids[index + 1 :]:
            rtts = [
                rtt
                for rtt in (
                    by_id[a].get("rtt_ms", {}).get(b),
                    by_id[b].get("rtt_ms", {}).get(a),
                    own_rtt.get(b) if a == self_id else own_rtt.get(a) if b == self_id else None,
                )
                if isinstance(rtt, int | float)
            ]
            if not rtts:
                continue
            carries = (["API"] if {a, b} & hosts else []) + (
                ["RPC"] if frozenset((a, b)) in rpc_pairs else []
            )
            both_fast = all(by_id[n].get("fast_lane_port") for n in (a, b))
            other = b if a == self_id else a if b == self_id else None
            lane = "fast lane" if both_fast else "QUIC"
            if other is not None and (
                other[:10] in quic_for_now or tunnel_lanes.get(other, "fast") != "fast"
            ):
                lane = "QUIC"
            links.append(
                {"a": a, "b": b, "rtt_ms": round(min(rtts), 1), "carries": carries, "lane": lane}
            )
    return links + _relayed_links(by_id, status, self_id)


def _relayed_links(
    by_id: Mapping[str, Json], status: Mapping[str, Any], self_id: str
) -> list[Json]:
    """This node's API requests to hosts it reaches only through a relay: one link each."""
    relayed = (status.get("api_lanes") or {}).get("relayed_for_now", {})
    full = {short_id(NodeId(node_id)): node_id for node_id in by_id}
    return [
        {
            "a": self_id,
            "b": full[target],
            "rtt_ms": None,
            "carries": ["API"],
            "lane": f"relay via {via}",
        }
        for target, via in sorted(relayed.items())
        if target in full and self_id
    ]


def _groups(members: Sequence[Json], status: Mapping[str, Any]) -> list[Json]:
    split = status.get("split") or {}
    return [
        {
            "model": model,
            "host": host,
            "workers": sorted(workers),
            "tensor_split": list(split.get("tensor_split", []))
            if split.get("model") == model and split.get("host") == host
            else [],
        }
        for (host, model), workers in sorted(_workers_of(members).items())
    ]


def _models(status: Mapping[str, Any], records: Mapping[str, Json]) -> list[Json]:
    sizes: dict[str, int] = {}
    for record in records.values():
        for name, size in record.get("models_on_disk", {}).items():
            sizes.setdefault(name, int(size))
    context = status.get("ctx_size")
    models = []
    for model in status.get("models", []):
        name = model["name"]
        warm = int(model.get("nodes", 0)) > 0
        models.append(
            {
                "name": name,
                "warm": warm,
                "nodes": int(model.get("nodes", 0)),
                "state": model.get("state", ""),
                "reason": "" if warm else model.get("reason", "") or model.get("state", ""),
                "size_bytes": sizes.get(name),
                "context": context,
                "quant": quant_of(name),
                "serving_nodes": _serving_nodes(name, model, records, status),
            }
        )
    return models


def _serving_nodes(
    name: str, model: Mapping[str, Any], records: Mapping[str, Json], status: Mapping[str, Any]
) -> list[str]:
    """Node ids that serve `name`: hosts and the rpc workers of their splits."""
    nodes = [
        r["node_id"]
        for r in records.values()
        if name in r.get("serving", {}) and r["serving"][name]["role"] != "loading"
    ]
    if model.get("host") == "local" and int(model.get("nodes", 0)) > 0:
        nodes.append(status.get("node", {}).get("node_id", ""))
    nodes += list(model.get("remote_hosts", []))
    return sorted(set(n for n in nodes if n))


def _status_line(status: Mapping[str, Any], node_count: int, mesh_vram: int) -> Json:
    models = status.get("models", [])
    warm = [m for m in models if int(m.get("nodes", 0)) > 0]
    waiting = [m for m in models if "vram" in str(m.get("reason", "")).lower()]
    loading = [m for m in models if m.get("state") == "loading" and m not in warm]
    if warm:
        state, detail = "ready", f"{len(warm)} model(s) warm"
    elif waiting:
        state, detail = "waiting", f"waiting for peers: {waiting[0].get('reason', '')}"
    elif loading:
        state, detail = "loading", f"{loading[0]['name']}: {loading[0].get('reason', '')}"
    else:
        state, detail = "idle", "no model yet"
    return {"state": state, "detail": detail, "nodes": node_count, "mesh_vram_bytes": mesh_vram}
