"""Placement rules: fit, host election with stickiness, workers by RTT, tensor split."""

from __future__ import annotations

import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.core.planner import (
    GroupPlan,
    ModelNeed,
    elect_host,
    fits,
    plan_group,
    plan_is_stable,
    split_ratios,
)
from mesh_llm.wire.messages import NodeRecord

GB = 10**9
NEED = ModelNeed("m", 10 * GB, 0)


def rec(
    node_id: str, vram_gb: float, rpc: str = "7.0.0", rtt: dict[str, float] | None = None
) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, version=1, vram_bytes=int(vram_gb * GB), rpc_protocol=rpc, rtt_ms=rtt or {}
    )


def test_fit_needs_ten_percent_headroom() -> None:
    assert fits(11 * GB, NEED)
    assert not fits(11 * GB - 1, NEED)


def test_host_is_most_vram_then_lowest_id_and_incumbent_sticks() -> None:
    records = {"a": rec("a", 8), "b": rec("b", 16), "c": rec("c", 16)}
    assert elect_host(records, ["a", "b", "c"], None) == "b"
    assert elect_host(records, ["a", "b", "c"], "a") == "a"  # incumbent keeps the role
    assert elect_host(records, ["b", "c"], "a") == "b"  # the incumbent left


def test_model_that_fits_is_solo() -> None:
    records = {"a": rec("a", 20), "b": rec("b", 5)}
    plan = plan_group(
        "m", NEED, records, members=["a", "b"], standby=[], force_split=False, incumbent_host=None
    )
    assert plan == GroupPlan("m", "a", (), ())


def test_forced_split_orders_workers_then_host() -> None:
    records = {"h": rec("h", 20, rtt={"w": 1.0}), "w": rec("w", 10)}
    plan = plan_group(
        "m", NEED, records, members=["h", "w"], standby=[], force_split=True, incumbent_host=None
    )
    assert plan.host == "h" and plan.workers == ("w",)
    assert plan.tensor_split == (0.33, 0.67)


def test_small_worker_gets_a_small_share() -> None:
    records = {"h": rec("h", 47), "w": rec("w", 1, rtt={"h": 1.0})}  # either side's RTT
    plan = plan_group(
        "m", NEED, records, members=["h"], standby=["w"], force_split=True, incumbent_host=None
    )
    assert plan.tensor_split == (0.02, 0.98)


def test_too_big_waits_with_the_exact_message() -> None:
    records = {"h": rec("h", 6, rtt={"w": 1.0}), "w": rec("w", 2)}
    plan = plan_group(
        "m", NEED, records, members=["h"], standby=["w"], force_split=False, incumbent_host=None
    )
    assert plan.waiting == "Waiting for more peers — need 11.0 GB, have 8.0 GB"
    assert plan.tensor_split == ()


def test_a_peer_whose_rtt_nobody_measured_yet_is_no_worker() -> None:
    # A 150 ms peer is unmeasured for its first heartbeats: counting that as 0 ms made it a
    # worker until the RTT arrived (seen in the multi-host tier).
    records = {"h": rec("h", 20), "w": rec("w", 10)}
    plan = plan_group(
        "m", NEED, records, members=["h"], standby=["w"], force_split=True, incumbent_host=None
    )
    assert plan == GroupPlan("m", "h", (), ())  # solo meanwhile
    records = {"h": rec("h", 6), "w": rec("w", 6)}
    plan = plan_group(
        "m", NEED, records, members=["h"], standby=["w"], force_split=False, incumbent_host=None
    )
    assert plan.workers == () and (plan.waiting or "").startswith("Waiting for more peers")


def test_workers_by_rtt_with_cap_and_protocol() -> None:
    records = {
        "h": rec("h", 6, rtt={"near": 5.0, "far": 200.0, "mid": 30.0}),
        "near": rec("near", 6),
        "mid": rec("mid", 6),
        "far": rec("far", 60),
        "old": rec("old", 60, rpc="6.0.0"),
    }
    plan = plan_group(
        "m",
        NEED,
        records,
        members=["h"],
        standby=["near", "mid", "far", "old"],
        force_split=False,
        incumbent_host=None,
    )
    assert plan.workers == ("near",)
    assert plan.waiting is None


def test_stability() -> None:
    plan = GroupPlan("m", "h", ("a", "b"), (0.3, 0.3, 0.4))
    assert plan_is_stable(plan, GroupPlan("m", "h", ("b", "a"), (0.3, 0.3, 0.4)))
    assert not plan_is_stable(plan, GroupPlan("m", "h", ("a",), (0.5, 0.5)))
    assert not plan_is_stable(None, plan)


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=8))
def test_split_ratios_sum_to_one(vram: list[int]) -> None:
    ratios = split_ratios(vram)
    assert len(ratios) == len(vram)
    assert all(r >= 0 for r in ratios)
    assert sum(ratios) == pytest.approx(1.0, abs=1e-9)


@given(
    st.integers(min_value=0, max_value=1000),
    st.lists(st.floats(min_value=1, max_value=64), min_size=2, max_size=6),
)
def test_all_nodes_agree_whatever_the_order(seed: int, vrams: list[float]) -> None:
    records = {f"n{i}": rec(f"n{i}", v) for i, v in enumerate(vrams)}
    members = list(records)
    shuffled = members[:]
    random.Random(seed).shuffle(shuffled)
    reordered = {k: records[k] for k in shuffled}

    def plan(group: dict[str, NodeRecord], order: list[str]) -> object:
        return plan_group(
            "m", NEED, group, members=order, standby=[], force_split=True, incumbent_host=None
        )

    assert plan(records, members) == plan(reordered, shuffled)


@given(st.floats(min_value=-0.01, max_value=0.01))
def test_vram_jitter_never_moves_an_incumbent(jitter: float) -> None:
    records = {"h": rec("h", 10), "big": rec("big", 10 * (1 + jitter) + 0.1)}
    plan = plan_group(
        "m", NEED, records, members=["h", "big"], standby=[], force_split=True, incumbent_host="h"
    )
    assert plan.host == "h"


def test_forced_split_without_any_worker_serves_solo_if_it_fits() -> None:
    records = {"h": rec("h", 20)}
    plan = plan_group(
        "m", NEED, records, members=["h"], standby=[], force_split=True, incumbent_host="h"
    )
    assert plan == GroupPlan("m", "h", (), ())


def test_assignment_takes_a_wanted_unserved_model_on_disk() -> None:
    from mesh_llm.core.planner import assign_model
    from mesh_llm.wire.messages import ServingInfo

    seed = NodeRecord(
        node_id="s",
        version=1,
        vram_bytes=20 * GB,
        requested_models=("a", "b"),
        serving={"a": ServingInfo("host", True, "s")},
    )
    joiner = NodeRecord(
        node_id="j", version=1, vram_bytes=20 * GB, models_on_disk={"a": GB, "b": GB}
    )
    assert assign_model("j", {"s": seed, "j": joiner}) == "b"
    small = NodeRecord(node_id="j", version=1, vram_bytes=GB, models_on_disk={"b": GB})
    assert assign_model("j", {"s": seed, "j": small}) is None  # does not fit
    nothing = NodeRecord(node_id="j", version=1, vram_bytes=20 * GB, models_on_disk={"c": GB})
    assert assign_model("j", {"s": seed, "j": nothing}) is None


def test_assignment_prefers_the_wanted_model_with_the_most_demand() -> None:
    from mesh_llm.core.planner import assign_model

    disk = {m: GB for m in ("a", "b", "c")}
    seed = NodeRecord(node_id="s", version=1, requested_models=("a", "b", "c"))
    busy = NodeRecord(node_id="x", version=1, demand={"c": 3.0, "b": 1.0})
    also = NodeRecord(node_id="y", version=1, demand={"b": 2.5})  # b: 3.5 in total
    for joiner_id in ("j1", "j2", "j3", "j4"):
        joiner = NodeRecord(node_id=joiner_id, version=1, vram_bytes=20 * GB, models_on_disk=disk)
        records = {"s": seed, "x": busy, "y": also, joiner_id: joiner}
        assert assign_model(joiner_id, records) == "b"
    # without demand the joiners spread by the hash of their id
    quiet = {"s": seed}
    picks = {
        assign_model(j, {**quiet, j: NodeRecord(j, 1, vram_bytes=20 * GB, models_on_disk=disk)})
        for j in (f"j{i}" for i in range(12))
    }
    assert len(picks) > 1


def test_demand_meter_decays_and_flags_changes() -> None:
    from mesh_llm.config import Config
    from mesh_llm.core.demand import DemandMeter, rates_changed

    half_life_s = Config().demand_half_life_s
    meter = DemandMeter(half_life_s)
    for i in range(10):
        meter.observe("m", float(i))
    now = rates = meter.rates(10.0)
    assert 5.0 < rates["m"] < 7.0  # ~10 requests in the last 10 s, smoothed over minutes
    later = meter.rates(10.0 + half_life_s)
    assert later["m"] == pytest.approx(rates["m"] / 2, rel=0.02)
    assert meter.rates(10.0 + 20 * half_life_s) == {}
    assert rates_changed(now, later) and not rates_changed(now, dict(now))
    assert rates_changed({}, {"m": 1.0})
