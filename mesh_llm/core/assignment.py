"""Which group a node takes part in, from the gossiped records — pure.

`own_group_plan` is the plan of the model a node serves (it may host it alone, host a split, or
wait); `worker_assignment` finds the split, if any, in which a node is a worker: every host's
plan is recomputed from the same records, so host and workers agree without messages.
`need_of` estimates a model's need from the sizes nodes report when the node has no file of
its own (weights only: the KV cache is unknown before reading the file). Built on
`core/planner.py`; no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Mapping

from mesh_llm.core.planner import (
    DEFAULT_FACTORS,
    GroupPlan,
    ModelNeed,
    PlanFactors,
    fits,
    plan_group,
)
from mesh_llm.wire.messages import NodeRecord, ServingInfo

_NONE = ServingInfo("none")


def standby_nodes(records: Mapping[str, NodeRecord]) -> list[str]:
    """Nodes that serve nothing and stand by: worker candidates of every split."""
    return sorted(n for n, r in records.items() if r.role == "standby" and not r.serving)


def incumbent_host(model: str, records: Mapping[str, NodeRecord]) -> str | None:
    """The node that hosts `model` now (the lowest id if several claim it)."""
    hosts = sorted(n for n, r in records.items() if r.serving.get(model, _NONE).role == "host")
    return hosts[0] if hosts else None


def own_group_plan(
    self_id: str,
    need: ModelNeed,
    records: Mapping[str, NodeRecord],
    factors: PlanFactors = DEFAULT_FACTORS,
) -> GroupPlan:
    """The plan of the model `self_id` serves: solo when it fits and no member forces a split."""
    me = records[self_id]
    members = sorted(n for n, r in records.items() if need.name in r.serving)
    force = any(need.name in records[n].split_models for n in members)
    if not force and fits(me.vram_bytes, need, factors):
        return GroupPlan(need.name, self_id, (), (), None)
    return plan_group(
        need.name,
        need,
        records,
        members=members,
        standby=standby_nodes(records),
        force_split=force,
        incumbent_host=incumbent_host(need.name, records),
        factors=factors,
    )


def need_of(
    model: str, records: Mapping[str, NodeRecord], own: ModelNeed | None = None
) -> ModelNeed | None:
    """`own` when it is this model's; else the largest size a node reports (weights only)."""
    if own is not None and own.name == model:
        return own
    sizes = [r.models_on_disk[model] for r in records.values() if model in r.models_on_disk]
    return ModelNeed(model, max(sizes), 0) if sizes else None


def worker_assignment(
    self_id: str,
    records: Mapping[str, NodeRecord],
    own: ModelNeed | None = None,
    factors: PlanFactors = DEFAULT_FACTORS,
) -> tuple[str, str] | None:
    """(model, host) of the split whose plan makes `self_id` a worker, or None."""
    for record in records.values():
        for model, info in record.serving.items():
            if info.role != "host" or record.node_id == self_id:
                continue
            members = sorted(n for n, r in records.items() if model in r.serving)
            force = any(model in records[n].split_models for n in members)
            need = need_of(model, records, own)
            if need is None or (not force and fits(record.vram_bytes, need, factors)):
                continue
            plan = plan_group(
                model,
                need,
                records,
                members=members,
                standby=standby_nodes(records),
                force_split=force,
                incumbent_host=record.node_id,
                factors=factors,
            )
            if self_id in plan.workers:
                return (model, record.node_id)
    return None
