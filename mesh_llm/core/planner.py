"""Placement decisions (DESIGN.md §7): fit, assignment, host election, workers, tensor split.

Every node runs these pure functions on the same gossiped `NodeRecord`s after every change and
reaches the same answer, so no extra messages are needed. Inputs are the records, each model's
need (weights + KV cache for the configured context, from the GGUF header) and this node's
flags; outputs are frozen dataclasses (`Assignment`, `GroupPlan`, `DesiredBackends`) that the
shell (`mesh_llm/placement.py`) acts on. Results never depend on mapping or sequence order.
Sans-I/O: no clock, no randomness (concurrent joiners spread by a hash of their node id), and
no imports outside `core/` and `wire/`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

from mesh_llm.wire.messages import NodeRecord, Role

FIT_FACTOR = 1.1
"""A model fits a node when its VRAM is at least this times the model's need."""
RTT_CAP_MS = 80.0
"""Peers farther than this from the host (round trip, milliseconds) never join its split."""
GB = 1e9
SERVER_ROLES = frozenset({"host", "loading"})
"""Roles in a `ServingInfo` that count as a server of the model (a worker only lends VRAM)."""


@dataclass(frozen=True, slots=True)
class ModelNeed:
    """What a model needs in memory, in bytes: weights plus KV cache for the configured context."""

    name: str
    weights_bytes: int
    kv_cache_bytes: int

    @property
    def need_bytes(self) -> int:
        return self.weights_bytes + self.kv_cache_bytes


@dataclass(frozen=True, slots=True)
class Assignment:
    """The model a serving node takes (None: standby) and the exact log line that says why."""

    model: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class GroupPlan:
    """Who hosts a model, which workers lend VRAM, the split ratios, or why it waits.

    `tensor_split` is in llama-server's device order: the `--rpc` devices first, in the order
    of `workers`, then the host's own device last — so it reads (workers…, host). It is empty
    when the host serves solo or while `waiting` says why the group cannot start yet.
    """

    model: str
    host: str | None
    workers: tuple[str, ...]
    tensor_split: tuple[float, ...]
    waiting: str | None = None


@dataclass(frozen=True, slots=True)
class DesiredBackends:
    """What this node should run: a llama-server (model, workers, tensor split), an rpc-server
    for a host, both, or neither."""

    llama_server: tuple[str, tuple[str, ...], tuple[float, ...]] | None
    rpc_server_for: str | None


# -- fit and assignment ---------------------------------------------------------------------


def fits(vram_bytes: int, need: ModelNeed) -> bool:
    """A model fits a node when its VRAM (bytes) is at least 1.1 × (weights + KV cache)."""
    return vram_bytes >= FIT_FACTOR * need.need_bytes


def hosts_for(model: str, records: Mapping[str, NodeRecord]) -> list[str]:
    """Node ids (sorted) whose serving map has `model` as a ready host: where to route requests."""
    return sorted(
        n
        for n, r in records.items()
        if (info := r.serving.get(model)) is not None and info.role == "host" and info.ready
    )


def assign_model(
    self_id: str,
    records: Mapping[str, NodeRecord],
    needs: Mapping[str, ModelNeed] | None = None,
    explicit: Sequence[str] = (),
) -> Assignment:
    """The model node `self_id` serves, in DESIGN §7 order.

    1. the first explicit `--model`;
    2. a requested model (union of every record's `requested_models`) that nobody else serves
       (hosts or loads), on this node's disk and fitting its VRAM — concurrent joiners with the
       same view spread over the candidates by a hash of their node id;
    3. the requested model it can serve with the highest demand per server, where demand per
       server = (nodes requesting it) / (servers + 1);
    4. none: standby, a candidate rpc worker.

    `needs` gives each model's need; a model missing from it is estimated from its size on this
    node's disk (weights only: the KV cache is unknown before reading the file).
    """
    if explicit:
        return Assignment(explicit[0], f"Assigned to serve {explicit[0]} (--model)")
    me = records.get(self_id)
    if me is None:
        return Assignment(None, STANDBY_REASON)
    needs = needs or {}
    servable = sorted(
        m
        for m in _requested(records.values())
        if m in me.models_on_disk
        and fits(me.vram_bytes, needs.get(m) or ModelNeed(m, me.models_on_disk[m], 0))
    )
    servers = {m: _server_count(m, records, exclude=self_id) for m in servable}
    unserved = [m for m in servable if servers[m] == 0]
    if unserved:
        choice = _spread(self_id, unserved)
        return Assignment(choice, f"Assigned to serve {choice} (needed by mesh, already on disk)")
    if not servable:
        return Assignment(None, STANDBY_REASON)
    demand = {m: Fraction(_requesters(m, records), servers[m] + 1) for m in servable}
    best = max(demand.values())
    choice = _spread(self_id, [m for m in servable if demand[m] == best])
    return Assignment(
        choice, f"Assigned to serve {choice} (highest demand per server, already on disk)"
    )


STANDBY_REASON = "No unserved model fits — standing by as a worker"


def _requested(records: Iterable[NodeRecord]) -> set[str]:
    return {m for r in records for m in r.requested_models}


def _requesters(model: str, records: Mapping[str, NodeRecord]) -> int:
    return sum(1 for r in records.values() if model in r.requested_models)


def _server_count(model: str, records: Mapping[str, NodeRecord], *, exclude: str) -> int:
    """Nodes other than `exclude` hosting or loading `model` (this node's own entry must not
    count, or re-running the assignment while it loads would move it elsewhere)."""
    return sum(
        1
        for n, r in records.items()
        if n != exclude and (info := r.serving.get(model)) is not None and info.role in SERVER_ROLES
    )


def _spread(node_id: str, candidates: Sequence[str]) -> str:
    """One of `candidates`, chosen by a hash of `node_id` so that joiners spread out."""
    ordered = sorted(candidates)
    return ordered[int(hashlib.sha256(node_id.encode()).hexdigest(), 16) % len(ordered)]


# -- host election and workers --------------------------------------------------------------


def elect_host(
    records: Mapping[str, NodeRecord], members: Iterable[str], incumbent: str | None
) -> str | None:
    """The incumbent while it is an alive member (no flapping); else the member with the most
    VRAM, ties broken by the lowest node id. None when no member is alive."""
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
    rtt_ms: Mapping[tuple[str, str], float] | None = None,
) -> GroupPlan:
    """The plan of the group of `model` that contains its elected host.

    `members` chose the model; `standby` nodes have none and may lend VRAM. `records` holds the
    alive nodes. The host is `incumbent_host` while it is an alive member, else the member with
    the most VRAM (ties: lowest id). If the host fits and not `force_split`, it serves solo (any
    other fitting member is an independent replica and never a worker). Otherwise workers are
    added by lowest RTT to the host (from `rtt_ms`, keyed (a, b) either way, else either
    node's record; unknown RTTs rank after measured ones), skipping peers above `RTT_CAP_MS`,
    with another RPC protocol or no VRAM, until the total VRAM covers 1.1 × the need;
    `force_split` takes at least one. A forced split with nobody to pair with but a fitting host
    serves solo meanwhile. Not enough VRAM ⇒ `waiting` says so, with the workers found so far
    and no tensor split. `tensor_split` order: workers (as returned), then the host.
    """
    host = elect_host(records, sorted(set(members)), incumbent_host)
    if host is None:
        return GroupPlan(model, None, (), (), "No node serves this model")
    host_record = records[host]
    if fits(host_record.vram_bytes, need) and not force_split:
        return GroupPlan(model, host, (), ())
    candidates = _candidates(host, need, records, members, standby, force_split)
    workers = _choose_workers(
        host_record, need, records, candidates, force_split=force_split, rtt_ms=rtt_ms or {}
    )
    if force_split and not workers and fits(host_record.vram_bytes, need):
        return GroupPlan(model, host, (), ())
    total = host_record.vram_bytes + sum(records[w].vram_bytes for w in workers)
    if total < FIT_FACTOR * need.need_bytes or (force_split and not workers):
        return GroupPlan(model, host, workers, (), waiting_message(need, total))
    ordered = (*workers, host)
    return GroupPlan(model, host, workers, split_ratios([records[n].vram_bytes for n in ordered]))


def waiting_message(need: ModelNeed, have_bytes: int) -> str:
    """`Waiting for more peers — need X GB, have Y GB` (GB = 10⁹ bytes, one decimal)."""
    wanted = FIT_FACTOR * need.need_bytes / GB
    return f"Waiting for more peers — need {wanted:.1f} GB, have {have_bytes / GB:.1f} GB"


def _candidates(
    host: str,
    need: ModelNeed,
    records: Mapping[str, NodeRecord],
    members: Sequence[str],
    standby: Sequence[str],
    force_split: bool,
) -> list[str]:
    """Possible workers: other alive members (a member that fits serves its own replica unless
    the split is forced) and standby nodes; never clients, never nodes without VRAM."""
    protocol = records[host].rpc_protocol
    eligible_members = {
        m
        for m in members
        if force_split or m not in records or not fits(records[m].vram_bytes, need)
    }
    return sorted(
        n
        for n in eligible_members | set(standby)
        if n != host
        and (r := records.get(n)) is not None
        and r.role != Role.CLIENT.value
        and r.vram_bytes > 0
        and r.rpc_protocol == protocol
    )


def _choose_workers(
    host: NodeRecord,
    need: ModelNeed,
    records: Mapping[str, NodeRecord],
    candidates: Sequence[str],
    *,
    force_split: bool,
    rtt_ms: Mapping[tuple[str, str], float],
) -> tuple[str, ...]:
    """Nearest first (measured before unknown, then most VRAM, then id) until VRAM suffices."""
    rtts = {c: _rtt(host, records[c], rtt_ms) for c in candidates}
    nearest = sorted(
        (c for c in candidates if (rtt := rtts[c]) is None or rtt <= RTT_CAP_MS),
        key=lambda c: (rtts[c] is None, rtts[c] or 0.0, -records[c].vram_bytes, c),
    )
    workers: list[str] = []
    total = host.vram_bytes
    for candidate in nearest:
        if total >= FIT_FACTOR * need.need_bytes and (workers or not force_split):
            break
        workers.append(candidate)
        total += records[candidate].vram_bytes
    return tuple(workers)


def _rtt(
    host: NodeRecord, other: NodeRecord, rtt_ms: Mapping[tuple[str, str], float]
) -> float | None:
    """Round trip host ↔ other in ms: the given map first, then either node's record."""
    a, b = host.node_id, other.node_id
    for value in (
        rtt_ms.get((a, b)),
        rtt_ms.get((b, a)),
        host.rtt_ms.get(b),
        other.rtt_ms.get(a),
    ):
        if value is not None:
            return value
    return None


def split_ratios(vram: Sequence[int]) -> tuple[float, ...]:
    """Ratios proportional to `vram`, two decimals, non-negative, summing to 1.00. The rounding
    error goes to the largest share (the last one on ties: the host, in a plan). Equal shares
    when all VRAM is zero."""
    total = sum(vram)
    weights = list(vram) if total > 0 else [1] * len(vram)
    total = sum(weights)
    ratios = [round(v / total, 2) for v in weights]
    largest = max(range(len(ratios)), key=lambda i: (weights[i], i))  # ties: the host (last)
    ratios[largest] = round(1.0 - sum(r for i, r in enumerate(ratios) if i != largest), 2)
    return tuple(ratios)


# -- stability and what to run --------------------------------------------------------------


def plan_is_stable(old: GroupPlan | None, new: GroupPlan) -> bool:
    """Same host and same worker set, neither waiting: nothing to restart ("still host, no
    restart needed"). A changed tensor split alone does not restart llama-server."""
    return (
        old is not None
        and old.host == new.host
        and set(old.workers) == set(new.workers)
        and old.waiting is None
        and new.waiting is None
    )


def desired_backends(
    self_id: str, plan_by_model: Mapping[str, GroupPlan], assignment: Assignment
) -> DesiredBackends:
    """What `self_id` runs: a llama-server when it hosts the plan of its assigned model and that
    plan is not waiting; an rpc-server for the host of the first plan (by model name) that lists
    it as a worker."""
    llama_server = None
    plan = plan_by_model.get(assignment.model) if assignment.model is not None else None
    if plan is not None and plan.host == self_id and plan.waiting is None:
        llama_server = (plan.model, plan.workers, plan.tensor_split)
    rpc_server_for = next(
        (
            plan_by_model[m].host
            for m in sorted(plan_by_model)
            if self_id in plan_by_model[m].workers and plan_by_model[m].host != self_id
        ),
        None,
    )
    return DesiredBackends(llama_server, rpc_server_for)
