"""`core/assignment`: who works for which split, and a host's own plan — table tests."""

from __future__ import annotations

from dataclasses import replace

import pytest

from mesh_llm.core.assignment import (
    incumbent_host,
    need_of,
    own_group_plan,
    standby_nodes,
    worker_assignment,
)
from mesh_llm.core.planner import ModelNeed, PlanFactors
from mesh_llm.wire.messages import NodeRecord, ServingInfo

GB = 10**9
H, W, X = "h" * 64, "w" * 64, "x" * 64
HOSTING = {"m": ServingInfo("host", True, H)}


def node(
    node_id: str,
    vram_gb: float,
    *,
    role: str = "serving",
    serving: dict[str, ServingInfo] | None = None,
    protocol: str = "7",
    disk: dict[str, int] | None = None,
    split: tuple[str, ...] = (),
    rtt: dict[str, float] | None = None,
) -> NodeRecord:
    return NodeRecord(
        node_id,
        1,
        role=role,
        vram_bytes=int(vram_gb * GB),
        rpc_protocol=protocol,
        serving=serving or {},
        models_on_disk=disk or {},
        split_models=split,
        # Measured near the host unless a case says otherwise: an unmeasured peer is no worker.
        rtt_ms=rtt if rtt is not None else ({} if node_id == H else {H: 1.0}),
    )


HOST = node(H, 1, serving=HOSTING, disk={"m": int(1.5 * GB)})
STANDBY = node(W, 2, role="standby")

# (case, records, self id, own need) -> (model, host) or None
ASSIGNMENTS = [
    ("nobody hosts anything", [STANDBY], W, None, None),
    ("a host short of VRAM takes the standby node", [HOST, STANDBY], W, None, ("m", H)),
    (
        "a host that fits alone needs nobody",
        [replace(HOST, vram_bytes=3 * GB), STANDBY],
        W,
        None,
        None,
    ),
    ("another RPC protocol never pairs", [HOST, replace(STANDBY, rpc_protocol="8")], W, None, None),
    ("too far from the host", [HOST, replace(STANDBY, rtt_ms={H: 200.0})], W, None, None),
    (
        "a forced split takes a worker even when the host fits",
        [replace(HOST, vram_bytes=3 * GB, split_models=("m",)), STANDBY],
        W,
        None,
        ("m", H),
    ),
    ("the host is never its own worker", [HOST, STANDBY], H, None, None),
    (
        "this node's own need (with KV cache) counts, not the reported size",
        [replace(HOST, vram_bytes=2 * GB, models_on_disk={"m": GB}), STANDBY],
        W,
        ModelNeed("m", GB, 2 * GB),
        ("m", H),
    ),
]


@pytest.mark.parametrize(
    ("records", "self_id", "own", "expected"),
    [case[1:] for case in ASSIGNMENTS],
    ids=[case[0] for case in ASSIGNMENTS],
)
def test_worker_assignment(
    records: list[NodeRecord],
    self_id: str,
    own: ModelNeed | None,
    expected: tuple[str, str] | None,
) -> None:
    by_id = {r.node_id: r for r in records}
    assert worker_assignment(self_id, by_id, own) == expected


def test_fit_factor_comes_from_the_factors() -> None:
    records = {r.node_id: r for r in (replace(HOST, vram_bytes=int(1.6 * GB)), STANDBY)}
    assert worker_assignment(W, records) == ("m", H)  # 1.6 GB < 1.1 x 1.5 GB: split
    assert worker_assignment(W, records, factors=PlanFactors(fit_factor=1.0)) is None


@pytest.mark.parametrize(
    ("host_vram_gb", "split", "workers", "waiting"),
    [
        (3, (), (), None),  # fits: solo
        (1, (), (W,), None),  # short: the standby node lends its VRAM
        (3, ("m",), (W,), None),  # forced split
    ],
)
def test_own_group_plan(
    host_vram_gb: float, split: tuple[str, ...], workers: tuple[str, ...], waiting: str | None
) -> None:
    host = replace(HOST, vram_bytes=int(host_vram_gb * GB), split_models=split)
    plan = own_group_plan(H, ModelNeed("m", int(1.5 * GB), 0), {H: host, W: STANDBY})
    assert (plan.host, plan.workers, plan.waiting) == (H, workers, waiting)


def test_own_group_plan_waits_for_more_peers() -> None:
    plan = own_group_plan(H, ModelNeed("m", 5 * GB, 0), {H: HOST, W: STANDBY})
    assert plan.waiting is not None and "need 5.5 GB, have 3.0 GB" in plan.waiting


def test_need_of_own_first_then_largest_reported_size() -> None:
    records = {H: HOST, X: node(X, 1, disk={"m": 2 * GB})}
    own = ModelNeed("m", GB, GB)
    assert need_of("m", records, own) is own
    assert need_of("m", records) == ModelNeed("m", 2 * GB, 0)
    assert need_of("absent", records) is None


def test_standby_and_incumbent() -> None:
    other_host = node(X, 1, serving={"m": ServingInfo("host", True, X)})
    records = {H: HOST, W: STANDBY, X: other_host}
    assert standby_nodes(records) == [W]
    assert incumbent_host("m", records) == H  # the lowest id of two claimants
    assert incumbent_host("absent", records) is None
