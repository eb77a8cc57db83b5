"""Placement rules (DESIGN §7): fit, assignment, host election with stickiness, workers by RTT,
tensor split, stability and the backends a node runs."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh_llm.core.planner import (
    STANDBY_REASON,
    Assignment,
    DesiredBackends,
    GroupPlan,
    ModelNeed,
    assign_model,
    desired_backends,
    elect_host,
    fits,
    hosts_for,
    plan_group,
    plan_is_stable,
    split_ratios,
)
from mesh_llm.wire.messages import NodeRecord, ServingInfo

GB = 10**9
NEED = ModelNeed("m", 10 * GB, 0)  # must cover 11 GB


def rec(
    node_id: str,
    vram_gb: float = 0,
    rpc: str = "7.0.0",
    rtt: dict[str, float] | None = None,
    **fields: Any,
) -> NodeRecord:
    return NodeRecord(
        node_id=node_id,
        version=1,
        vram_bytes=int(vram_gb * GB),
        rpc_protocol=rpc,
        rtt_ms=rtt or {},
        **fields,
    )


def by_id(*records: NodeRecord) -> dict[str, NodeRecord]:
    return {r.node_id: r for r in records}


def plan(
    records: Mapping[str, NodeRecord],
    members: Sequence[str],
    standby: Sequence[str] = (),
    *,
    force: bool = False,
    incumbent: str | None = None,
    need: ModelNeed = NEED,
    rtt_ms: Mapping[tuple[str, str], float] | None = None,
) -> GroupPlan:
    return plan_group(
        "m",
        need,
        records,
        members=members,
        standby=standby,
        force_split=force,
        incumbent_host=incumbent,
        rtt_ms=rtt_ms,
    )


# -- fit ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vram", "need", "expected"),
    [
        (11 * GB, NEED, True),  # exactly 1.1 × need
        (11 * GB - 1, NEED, False),
        (12 * GB, ModelNeed("m", 8 * GB, 2 * GB), True),  # KV cache counts
        (10 * GB, ModelNeed("m", 8 * GB, 2 * GB), False),  # need met, headroom not
        (0, ModelNeed("m", 0, 0), True),
        (0, ModelNeed("m", 1, 0), False),
    ],
)
def test_fit_needs_ten_percent_headroom(vram: int, need: ModelNeed, expected: bool) -> None:
    assert fits(vram, need) is expected


def test_need_is_weights_plus_kv_cache() -> None:
    assert ModelNeed("m", 7, 3).need_bytes == 10


# -- assignment -----------------------------------------------------------------------------

SEED = rec(
    "seed",
    20,
    requested_models=("a", "b"),
    serving={"a": ServingInfo("host", True, "seed")},
)


@pytest.mark.parametrize(
    ("joiner", "needs", "explicit", "expected"),
    [
        pytest.param(
            rec("j", 20, models_on_disk={"a": GB, "b": GB}),
            {},
            ["x", "y"],
            Assignment("x", "Assigned to serve x (--model)"),
            id="explicit-first-wins",
        ),
        pytest.param(
            rec("j", 20, models_on_disk={"a": GB, "b": GB}),
            {},
            [],
            Assignment("b", "Assigned to serve b (needed by mesh, already on disk)"),
            id="unserved-on-disk",
        ),
        pytest.param(
            rec("j", 20, models_on_disk={"a": GB, "b": GB}),
            {"b": ModelNeed("b", GB, 30 * GB)},
            [],
            Assignment("a", "Assigned to serve a (highest demand per server, already on disk)"),
            id="kv-cache-too-big-falls-back-to-demand",
        ),
        pytest.param(
            rec("j", 1, models_on_disk={"b": GB}),
            {},
            [],
            Assignment(None, STANDBY_REASON),
            id="does-not-fit",
        ),
        pytest.param(
            rec("j", 20, models_on_disk={"c": GB}),
            {},
            [],
            Assignment(None, "No unserved model fits — standing by as a worker"),
            id="not-requested",
        ),
    ],
)
def test_assignment_rules(
    joiner: NodeRecord, needs: dict[str, ModelNeed], explicit: list[str], expected: Assignment
) -> None:
    assert assign_model("j", by_id(SEED, joiner), needs, explicit) == expected


def test_unknown_self_is_standby() -> None:
    assert assign_model("ghost", by_id(SEED)) == Assignment(None, STANDBY_REASON)


def test_demand_per_server_picks_the_most_wanted_model() -> None:
    # x: 3 requesters, 1 server ⇒ 1.5; y: 2 requesters, 0 other servers... but y is served twice.
    records = by_id(
        rec("r1", requested_models=("x", "y")),
        rec("r2", requested_models=("x", "y")),
        rec("r3", requested_models=("x",)),
        rec("h1", 20, serving={"x": ServingInfo("host", True, "h1")}),
        rec("h2", 20, serving={"y": ServingInfo("host", True, "h2")}),
        rec("h3", 20, serving={"y": ServingInfo("loading", False, "h3")}),
        rec("j", 20, models_on_disk={"x": GB, "y": GB}),
    )
    assert assign_model("j", records).model == "x"  # 3/2 beats 2/3


def test_own_serving_entry_does_not_count_as_a_server() -> None:
    me = rec("j", 20, models_on_disk={"b": GB}, serving={"b": ServingInfo("loading", False, "j")})
    assert assign_model("j", by_id(SEED, me)).model == "b"
    assert "needed by mesh" in assign_model("j", by_id(SEED, me)).reason


def test_identical_joiners_spread_over_two_candidates() -> None:
    wanted = rec("seed", requested_models=("x", "y"))
    choices = set()
    for joiner in ("a" * 64, "b" * 64):
        me = rec(joiner, 20, models_on_disk={"x": GB, "y": GB})
        choices.add(assign_model(joiner, by_id(wanted, me)).model)
    assert choices == {"x", "y"}


# -- host election --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("members", "incumbent", "expected"),
    [
        (["a", "b", "c"], None, "b"),  # most VRAM, tie b/c by id
        (["c", "b", "a"], None, "b"),  # order does not matter
        (["a", "b", "c"], "a", "a"),  # incumbent keeps the role
        (["b", "c"], "a", "b"),  # the incumbent left the group
        (["a", "b", "c", "gone"], "gone", "b"),  # the incumbent is dead (no record)
        ([], None, None),
    ],
)
def test_host_election(members: list[str], incumbent: str | None, expected: str | None) -> None:
    records = by_id(rec("a", 8), rec("b", 16), rec("c", 16))
    assert elect_host(records, members, incumbent) == expected


def test_incumbent_host_survives_a_bigger_joiner() -> None:
    records = by_id(rec("h", 6), rec("w", 6), rec("big", 9))
    assert plan(records, ["h", "w"]).host == "h"
    result = plan(records, ["h", "w", "big"], incumbent="h")
    assert result.host == "h" and result.waiting is None


def test_no_members_waits() -> None:
    assert plan({}, ["x"]).host is None


# -- solo and split -------------------------------------------------------------------------


def test_model_that_fits_is_solo() -> None:
    assert plan(by_id(rec("a", 20), rec("b", 5)), ["a", "b"]) == GroupPlan("m", "a", (), ())


def test_fitting_members_are_replicas_never_workers() -> None:
    records = by_id(rec("h", 6, rtt={"r": 1.0, "s": 50.0}), rec("r", 20), rec("s", 6))
    result = plan(records, ["h", "r", "s"], incumbent="h")
    assert result.workers == ("s",)  # r serves its own replica


@pytest.mark.parametrize(
    ("records", "members", "standby", "expected_workers", "waiting"),
    [
        pytest.param(
            by_id(
                rec("h", 6, rtt={"near": 5.0, "far": 200.0, "mid": 30.0}),
                rec("near", 6),
                rec("mid", 6),
                rec("far", 60),
                rec("old", 60, rpc="6.0.0"),
            ),
            ["h"],
            ["near", "mid", "far", "old"],
            ("near",),
            None,
            id="nearest-suffices-cap-and-protocol",
        ),
        pytest.param(
            by_id(rec("h", 3, rtt={"a": 10.0, "b": 20.0, "c": 5.0}), *(rec(n, 3) for n in "abc")),
            ["h"],
            ["a", "b", "c"],
            ("c", "a", "b"),
            None,
            id="added-in-rtt-order-until-covered",
        ),
        pytest.param(
            by_id(rec("h", 6, rtt={"far": 80.1}), rec("far", 60), rec("edge", 6, rtt={"h": 80.0})),
            ["h"],
            ["far", "edge"],
            ("edge",),
            None,
            id="cap-is-inclusive-and-peer-rtt-counts",
        ),
        pytest.param(
            by_id(rec("h", 6, rtt={"far": 81.0}), rec("far", 60), rec("old", 60, rpc="6.0.0")),
            ["h"],
            ["far", "old"],
            (),
            "Waiting for more peers — need 11.0 GB, have 6.0 GB",
            id="nobody-eligible",
        ),
        pytest.param(
            by_id(rec("h", 6, rtt={"m": 3.0}), rec("m", 6), rec("unknown", 6)),
            ["h"],
            ["unknown", "m"],
            ("m",),
            None,
            id="measured-before-unknown",
        ),
        pytest.param(
            by_id(rec("h", 6), rec("zero", 0), rec("client", 60, role="client")),
            ["h"],
            ["zero", "client"],
            (),
            "Waiting for more peers — need 11.0 GB, have 6.0 GB",
            id="no-vram-and-clients-never-join",
        ),
    ],
)
def test_workers_by_rtt(
    records: dict[str, NodeRecord],
    members: list[str],
    standby: list[str],
    expected_workers: tuple[str, ...],
    waiting: str | None,
) -> None:
    result = plan(records, members, standby)
    assert result.host == "h"
    assert result.workers == expected_workers
    assert result.waiting == waiting


def test_rtt_mapping_overrides_records() -> None:
    records = by_id(rec("h", 6, rtt={"a": 1.0, "b": 50.0}), rec("a", 6), rec("b", 6))
    assert plan(records, ["h"], ["a", "b"], rtt_ms={("b", "h"): 0.5}).workers == ("b",)
    assert plan(records, ["h"], ["a", "b"], rtt_ms={("h", "a"): 99.0}).workers == ("b",)


def test_forced_split_takes_a_worker_even_when_the_host_fits() -> None:
    records = by_id(rec("h", 20), rec("w", 10))
    result = plan(records, ["h", "w"], force=True)
    assert (result.host, result.workers, result.waiting) == ("h", ("w",), None)
    assert result.tensor_split == (0.33, 0.67)  # [worker, host]


def test_forced_split_without_any_worker_serves_solo_if_it_fits() -> None:
    assert plan(by_id(rec("h", 20)), ["h"], force=True, incumbent="h") == GroupPlan(
        "m", "h", (), ()
    )


def test_forced_split_without_worker_that_does_not_fit_waits() -> None:
    result = plan(by_id(rec("h", 5)), ["h"], force=True)
    assert result.waiting == "Waiting for more peers — need 11.0 GB, have 5.0 GB"


@pytest.mark.parametrize(
    ("vram_gb", "need", "message"),
    [
        ((6, 2), NEED, "Waiting for more peers — need 11.0 GB, have 8.0 GB"),
        (
            (4.05, 4.0),
            ModelNeed("m", 10 * GB, 1_181_818_182),
            "Waiting for more peers — need 12.3 GB, have 8.1 GB",
        ),
    ],
)
def test_waiting_message_exact_format(
    vram_gb: tuple[float, float], need: ModelNeed, message: str
) -> None:
    records = by_id(rec("h", vram_gb[0]), rec("w", vram_gb[1]))
    result = plan(records, ["h"], ["w"], need=need)
    assert result == GroupPlan("m", "h", ("w",), (), message)


# -- tensor split ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("vram_gb", "expected"),
    [
        ((10, 20), (0.33, 0.67)),  # [worker, host]: host has 2/3
        ((1, 47), (0.02, 0.98)),  # worker with --max-vram 1 GB
        ((1, 1, 1), (0.33, 0.33, 0.34)),  # rounding goes to the host (last) on ties
        ((0, 0), (0.5, 0.5)),
        ((5,), (1.0,)),
    ],
)
def test_split_ratios(vram_gb: tuple[int, ...], expected: tuple[float, ...]) -> None:
    ratios = split_ratios([v * GB for v in vram_gb])
    assert ratios == expected
    assert round(sum(ratios), 2) == 1.0


def test_tiny_worker_gets_a_small_share_in_a_plan() -> None:
    result = plan(by_id(rec("h", 47), rec("w", 1)), ["h"], ["w"], force=True)
    assert result.tensor_split == (0.02, 0.98)


# -- stability, routing, backends -----------------------------------------------------------


AB = GroupPlan("m", "h", ("a", "b"), (0.3, 0.3, 0.4))


@pytest.mark.parametrize(
    ("old", "new", "stable"),
    [
        (AB, GroupPlan("m", "h", ("b", "a"), (0.3, 0.3, 0.4)), True),
        (AB, GroupPlan("m", "h", ("a", "b"), (0.2, 0.4, 0.4)), True),  # ratios alone: no restart
        (AB, GroupPlan("m", "h", ("a",), (0.5, 0.5)), False),
        (GroupPlan("m", "h", (), ()), GroupPlan("m", "x", (), ()), False),
        (GroupPlan("m", "h", (), (), "Waiting"), GroupPlan("m", "h", (), ()), False),
        (None, GroupPlan("m", "h", (), ()), False),
    ],
)
def test_plan_is_stable(old: GroupPlan | None, new: GroupPlan, stable: bool) -> None:
    assert plan_is_stable(old, new) is stable


def test_hosts_for_lists_ready_hosts_only() -> None:
    records = by_id(
        rec("b", serving={"m": ServingInfo("host", True, "b")}),
        rec("a", serving={"m": ServingInfo("host", True, "a")}),
        rec("l", serving={"m": ServingInfo("loading", False, "l")}),
        rec("n", serving={"m": ServingInfo("host", False, "n")}),
        rec("w", serving={"m": ServingInfo("worker", True, "a")}),
        rec("o", serving={"other": ServingInfo("host", True, "o")}),
    )
    assert hosts_for("m", records) == ["a", "b"]


SPLIT = GroupPlan("m", "h", ("w",), (0.33, 0.67))


@pytest.mark.parametrize(
    ("self_id", "plans", "model", "expected"),
    [
        ("h", {"m": SPLIT}, "m", DesiredBackends(("m", ("w",), (0.33, 0.67)), None)),
        ("w", {"m": SPLIT}, "m", DesiredBackends(None, "h")),
        ("w", {"m": SPLIT}, None, DesiredBackends(None, "h")),  # standby lends VRAM
        ("h", {"m": GroupPlan("m", "h", (), (), "Waiting")}, "m", DesiredBackends(None, None)),
        ("x", {"m": SPLIT}, None, DesiredBackends(None, None)),
        ("x", {}, "m", DesiredBackends(None, None)),
        ("s", {"m": GroupPlan("m", "s", (), ())}, "m", DesiredBackends(("m", (), ()), None)),
    ],
)
def test_desired_backends(
    self_id: str, plans: dict[str, GroupPlan], model: str | None, expected: DesiredBackends
) -> None:
    assert desired_backends(self_id, plans, Assignment(model, "")) == expected


# -- properties -----------------------------------------------------------------------------


@given(st.lists(st.integers(min_value=0, max_value=10**12), min_size=1, max_size=8))
def test_split_ratios_sum_to_one_and_are_non_negative(vram: list[int]) -> None:
    ratios = split_ratios(vram)
    assert len(ratios) == len(vram)
    assert all(r >= 0 for r in ratios)
    assert round(sum(ratios), 2) == 1.0
    assert all(round(r, 2) == r for r in ratios)


NODE = st.fixed_dictionaries(
    {
        "vram": st.floats(min_value=0, max_value=64),
        "rpc": st.sampled_from(["7.0.0", "6.0.0"]),
        "rtt": st.one_of(st.none(), st.floats(min_value=0, max_value=150)),
        "member": st.booleans(),
    }
)


@given(
    st.lists(NODE, min_size=1, max_size=7),
    st.integers(min_value=0, max_value=10**6),
    st.booleans(),
    st.integers(min_value=0, max_value=8),
    st.floats(min_value=0.1, max_value=100),
)
def test_every_node_agrees_whatever_the_order(
    nodes: list[dict[str, Any]], seed: int, force: bool, incumbent: int, need_gb: float
) -> None:
    ids = [f"n{i}" for i in range(len(nodes))]
    records = {
        i: rec(i, n["vram"], n["rpc"], {} if n["rtt"] is None else {j: n["rtt"] for j in ids})
        for i, n in zip(ids, nodes, strict=True)
    }
    members = [i for i, n in zip(ids, nodes, strict=True) if n["member"]] or ids[:1]
    standby = [i for i in ids if i not in members]
    need = ModelNeed("m", int(need_gb * GB), 0)
    host = f"n{incumbent}"
    expected = plan(records, members, standby, force=force, incumbent=host, need=need)

    shuffle = random.Random(seed).shuffle
    order, members2, standby2 = ids[:], members[:], standby[:]
    for seq in (order, members2, standby2):
        shuffle(seq)
    reordered = {i: records[i] for i in order}
    assert plan(reordered, members2, standby2, force=force, incumbent=host, need=need) == expected
    for split in [expected.tensor_split] if expected.tensor_split else []:
        assert round(sum(split), 2) == 1.0 and all(r >= 0 for r in split)
        assert len(split) == len(expected.workers) + 1


@given(
    st.lists(st.floats(min_value=1, max_value=64), min_size=1, max_size=6),
    st.lists(st.floats(min_value=-0.01, max_value=0.01), min_size=6, max_size=6),
    st.floats(min_value=1, max_value=64),
    st.booleans(),
)
def test_vram_jitter_never_moves_an_incumbent(
    others: list[float], jitter: list[float], host_vram: float, force: bool
) -> None:
    def records_with(scale: list[float]) -> dict[str, NodeRecord]:
        peers = [
            rec(f"p{i}", v * (1 + s)) for i, (v, s) in enumerate(zip(others, scale, strict=True))
        ]
        return by_id(rec("h", host_vram), *peers)

    members = ["h", *(f"p{i}" for i in range(len(others)))]
    before = plan(records_with([0.0] * len(others)), members, force=force, incumbent="h")
    after = plan(records_with(jitter[: len(others)]), members, force=force, incumbent="h")
    assert before.host == after.host == "h"
