"""Placement decisions: fit, host election, workers, tensor split — pure.

Every node runs these functions on the same gossiped records and reaches the same answer, so
no extra messages are needed. Inputs are `NodeRecord`s and the model's need (weights + KV cache
for the configured context); outputs are plain dataclasses. Sans-I/O: no clock, no randomness.
Device order: llama-server lists its `--rpc` devices in the order given; the host's own share
(its local device, or on a CPU host a local rpc-server listed last) comes after the workers, so
`tensor_split` is (workers…, host).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mesh_llm.core.demand import mesh_demand
from mesh_llm.wire.messages import NodeRecord

GB = 1e9


@dataclass(frozen=True, slots=True)
class PlanFactors:
    """The planner's tunables (`Config.planner`, `[planner]` in config.toml)."""

    fit_factor: float = 1.1  # a node fits a model with VRAM ≥ this × (weights + KV cache)
    rtt_cap_ms: float = 80.0  # workers farther than this from the host are never chosen


DEFAULT_FACTORS = PlanFactors()


@dataclass(frozen=True, slots=True)
class ModelNeed:
    """What a model needs in memory: weights plus KV cache for the configured context."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """Who hosts a model, which workers lend VRAM, the split ratios, or why it waits."""

    model: str
    host: str | None
    workers: tuple[str, ...]
    tensor_split: tuple[float, ...]
    waiting: str | None = None


def fits(vram_bytes: int, need: ModelNeed, factors: PlanFactors = DEFAULT_FACTORS) -> bool:
    """A model fits a node when its VRAM is at least `fit_factor` × (weights + KV cache)."""
    return vram_bytes >= factors.fit_factor * need.need_bytes


def elect_host(
    records: Mapping[str, NodeRecord], members: Sequence[str], incumbent: str | None
) -> str | None:
    """The incumbent while it is a member (no flapping); else most VRAM, ties by node id."""
    present = [m for m in members if m in records]
    if incumbent is not None and incumbent in present:
        return incumbent
    if not present:
        return None
    return min(present, key=lambda n: (-records[n].vram_bytes, n))


def plan_group(
    model: str,
    need: ModelNeed,
    records: Mapping[str, NodeRecord],
    *,
    members: Sequence[str],
    standby: Sequence[str],
    force_split: bool,
    incumbent_host: str | None,
    factors: PlanFactors = DEFAULT_FACTORS,
) -> GroupPlan:
    """The split plan of `model` among `members` (nodes that chose it) and `standby` nodes."""
    host = elect_host(records, sorted(members), incumbent_host)
    if host is None:
        return GroupPlan(model, None, (), (), "no node serves this model")
    host_record = records[host]
    enough = factors.fit_factor * need.need_bytes
    if fits(host_record.vram_bytes, need, factors) and not force_split:
        return GroupPlan(model, host, (), ())
    candidates = sorted(
        (n for n in {*members, *standby} if n != host and n in records),
        key=lambda n: (_rtt(host_record, records[n]) or 0.0, -records[n].vram_bytes, n),
    )
    workers: list[str] = []
    total = host_record.vram_bytes
    for candidate in candidates:
        record = records[candidate]
        if record.rpc_protocol != host_record.rpc_protocol:
            continue
        rtt = _rtt(host_record, record)
        if rtt is None or rtt > factors.rtt_cap_ms:
            continue  # unmeasured counts as too far: a far peer must never be picked, even once
        if total >= enough and (workers or not force_split):
            break
        workers.append(candidate)
        total += record.vram_bytes
    if force_split and not workers and fits(host_record.vram_bytes, need, factors):
        return GroupPlan(model, host, (), ())  # nobody to split with (yet): serve solo meanwhile
    if total < enough or (force_split and not workers):
        wanted = enough / GB
        return GroupPlan(
            model,
            host,
            tuple(workers),
            (),
            f"Waiting for more peers — need {wanted:.1f} GB, have {total / GB:.1f} GB",
        )
    ordered = (*workers, host)
    return GroupPlan(
        model, host, tuple(workers), split_ratios([records[n].vram_bytes for n in ordered])
    )


def split_ratios(vram: Sequence[int]) -> tuple[float, ...]:
    """Ratios proportional to VRAM, two decimals, summing to exactly 1.00."""
    total = sum(vram)
    if total <= 0:  # nothing known: equal shares (the first takes the rounding remainder)
        vram, total = [1] * len(vram), len(vram)
    ratios = [round(v / total, 2) for v in vram]
    largest = max(range(len(ratios)), key=lambda i: vram[i])
    ratios[largest] = round(1.0 - sum(r for i, r in enumerate(ratios) if i != largest), 2)
    return tuple(ratios)


def plan_is_stable(old: GroupPlan | None, new: GroupPlan) -> bool:
    """Same host and same worker set: nothing to restart ("still host, no restart needed")."""
    return (
        old is not None
        and old.host == new.host
        and set(old.workers) == set(new.workers)
        and (old.waiting is None and new.waiting is None)
    )


def _rtt(host: NodeRecord, other: NodeRecord) -> float | None:
    """RTT between two nodes as either one measured it; None until one has published it."""
    return host.rtt_ms.get(other.node_id, other.rtt_ms.get(host.node_id))


def assign_model(
    self_id: str, records: Mapping[str, NodeRecord], factors: PlanFactors = DEFAULT_FACTORS
) -> str | None:
    """For a node without --model: a model the mesh requests that nobody serves yet, that is on
    this node's disk and fits its VRAM (weights only: the KV cache is unknown before reading the
    file). The candidate with the most request demand (gossiped rates) wins; without demand,
    concurrent joiners spread over the candidates by a hash of their node id."""
    me = records.get(self_id)
    if me is None:
        return None
    requested = {m for r in records.values() for m in r.requested_models}
    served = {m for r in records.values() for m, info in r.serving.items() if info.role != "worker"}
    candidates = sorted(
        m
        for m in requested - served
        if m in me.models_on_disk
        and fits(me.vram_bytes, ModelNeed(m, me.models_on_disk[m], 0), factors)
    )
    if not candidates:
        return None
    demand = mesh_demand([r.demand for r in records.values()])
    busiest = max(demand.get(m, 0.0) for m in candidates)
    if busiest > 0.0:
        candidates = [m for m in candidates if demand.get(m, 0.0) == busiest]
    return candidates[int(hashlib.sha256(self_id.encode()).hexdigest(), 16) % len(candidates)]
