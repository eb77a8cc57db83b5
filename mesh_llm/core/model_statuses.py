"""The models of the mesh as one node sees them: what the API lists and the router routes on.

`mesh_model_statuses` merges this node's own model servers (their statuses), the records the
node knows (gossip for a member, the routing table for a passive client) and the models the
node was asked to want, into one `ModelStatus` per model: a local model carries the other
hosts serving it ready as `remote` replicas; a model only other nodes serve is READY with its
hosts (with the aliases and capabilities their first host gossips); a model still loading
somewhere, or wanted but served nowhere, is LOADING with a reason (a wanted model is listed by
its model name, the spec it was wanted by — a catalog name — as its alias). Workers of a split
are never hosts. Pure: no I/O, no clock (`name_of`, spec to model name, is injected).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence

from mesh_llm.core.capabilities import Capability, parse_capabilities
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.wire.messages import NodeRecord


def mesh_model_statuses(
    own_id: str,
    records: Iterable[NodeRecord],
    local: Sequence[ModelStatus],
    wanted: Sequence[str],
    name_of: Callable[[str], str] = str,
) -> list[ModelStatus]:
    """One status per model: `local` first (with their remote replicas), then the models
    other nodes serve ready, then those loading or only wanted (`wanted` holds specs;
    `name_of` maps a spec to the model name it gossips as)."""
    hosts: dict[str, list[str]] = {}
    aliases: dict[str, tuple[str, ...]] = {}
    capabilities: dict[str, tuple[Capability, ...]] = {}
    loading: dict[str, str] = {}  # model -> a node loading it ("" when none is)
    for record in records:
        if record.node_id == own_id:
            continue
        for model, info in record.serving.items():
            if info.role == "worker":
                continue
            if info.ready:
                hosts.setdefault(model, []).append(record.node_id)
                aliases.setdefault(model, info.aliases)
                capabilities.setdefault(model, parse_capabilities(info.capabilities))
            else:
                loading.setdefault(model, record.node_id)
        for model in record.requested_models:
            loading.setdefault(model, "")
    wanted_aliases: dict[str, tuple[str, ...]] = {}
    for spec in wanted:  # by model name, as gossiped: a catalog name is an alias
        name = name_of(spec)
        loading.setdefault(name, "")
        if name != spec:
            wanted_aliases[name] = (spec,)
    statuses = [
        dataclasses.replace(status, remote=tuple(hosts.pop(status.name, ()))) for status in local
    ]
    known = {s.name for s in statuses} | {a for s in statuses for a in s.aliases}
    for model, nodes in hosts.items():
        if model not in known:
            statuses.append(
                ModelStatus(
                    ModelName(model),
                    ModelState.READY,
                    aliases=aliases.get(model, ()),
                    capabilities=capabilities.get(model, ()),
                    host=nodes[0],
                    remote=tuple(nodes),
                )
            )
            known.add(model)
    for model, node in loading.items():
        if model not in known:
            statuses.append(_loading(model, node, wanted_aliases.get(model, ())))
    return statuses


def _loading(model: str, node: str, aliases: tuple[str, ...]) -> ModelStatus:
    reason = f"loading on node {node[:10]}" if node else "wanted by the mesh; no node serves it yet"
    return ModelStatus(ModelName(model), ModelState.LOADING, reason, host=node, aliases=aliases)
