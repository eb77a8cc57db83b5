"""`mesh_model_statuses`: the models of the mesh as one node sees them, as a table."""

from __future__ import annotations

import pytest

from mesh_llm.core.capabilities import Capability
from mesh_llm.core.model_statuses import mesh_model_statuses
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.wire.messages import NodeRecord, ServingInfo

ME = "a" * 64
B = "b" * 64
C = "c" * 64
GEMMA = ModelName("gemma")
LOCAL_READY = ModelStatus(GEMMA, ModelState.READY, endpoint="http://127.0.0.1:1", aliases=("g",))


def record(
    node: str,
    *,
    serving: dict[str, ServingInfo] | None = None,
    requested_models: tuple[str, ...] = (),
) -> NodeRecord:
    return NodeRecord(node, 1, serving=serving or {}, requested_models=requested_models)


READY = ServingInfo(role="host", ready=True, aliases=("alias",))
LOADING = ServingInfo(role="loading", ready=False)
WORKER = ServingInfo(role="worker", ready=True)

# (case, records, local, wanted) -> [(name, state, host, remote, reason)]
CASES = [
    ("nothing anywhere", [], [], [], []),
    (
        "my own record is never a remote host",
        [record(ME, serving={"gemma": READY})],
        [LOCAL_READY],
        [],
        [("gemma", ModelState.READY, "local", (), "")],
    ),
    (
        "a local model gets the other hosts as replicas",
        [record(B, serving={"gemma": READY}), record(C, serving={"gemma": READY})],
        [LOCAL_READY],
        [],
        [("gemma", ModelState.READY, "local", (B, C), "")],
    ),
    (
        "a model only others serve is ready with its hosts and aliases",
        [record(B, serving={"qwen": READY})],
        [],
        [],
        [("qwen", ModelState.READY, B, (B,), "")],
    ),
    (
        "a split's worker is not a host",
        [record(B, serving={"qwen": WORKER})],
        [],
        [],
        [],
    ),
    (
        "loading elsewhere",
        [record(B, serving={"qwen": LOADING})],
        [],
        [],
        [("qwen", ModelState.LOADING, B, (), f"loading on node {B[:10]}")],
    ),
    (
        "requested by a node, served nowhere",
        [record(B, requested_models=("phi",))],
        [],
        [],
        [("phi", ModelState.LOADING, "", (), "wanted by the mesh; no node serves it yet")],
    ),
    (
        "wanted here, loading on another node",
        [record(B, serving={"phi": LOADING})],
        [],
        ["phi"],
        [("phi", ModelState.LOADING, B, (), f"loading on node {B[:10]}")],
    ),
    (
        "a ready host wins over one loading; a local alias hides a remote model of that name",
        [record(B, serving={"qwen": LOADING, "g": READY}), record(C, serving={"qwen": READY})],
        [LOCAL_READY],
        [],
        [
            ("gemma", ModelState.READY, "local", (), ""),
            ("qwen", ModelState.READY, C, (C,), ""),
        ],
    ),
]


@pytest.mark.parametrize(
    ("records", "local", "wanted", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_model_statuses(
    records: list[NodeRecord],
    local: list[ModelStatus],
    wanted: list[str],
    expected: list[tuple[str, ModelState, str, tuple[str, ...], str]],
) -> None:
    statuses = mesh_model_statuses(ME, records, local, wanted)
    got = [(s.name, s.state, s.host, s.remote, s.reason) for s in statuses]
    assert got == expected


def test_aliases_of_a_remote_model_come_from_its_host() -> None:
    [status] = mesh_model_statuses(ME, [record(B, serving={"qwen": READY})], [], [])
    assert status.aliases == ("alias",) and status.routable


def test_capabilities_of_a_remote_model_come_from_its_host_gossip() -> None:
    embed = ServingInfo(role="host", ready=True, capabilities=("embeddings", "from-the-future"))
    [status] = mesh_model_statuses(ME, [record(B, serving={"bge": embed})], [], [])
    assert status.capabilities == (Capability.EMBEDDINGS,)


def test_a_model_wanted_by_catalog_name_is_listed_by_model_name_with_that_alias() -> None:
    names = {"Qwen-Small": "qwen-small-q4"}
    [status] = mesh_model_statuses(ME, [], [], ["Qwen-Small"], lambda s: names.get(s, s))
    assert (status.name, status.state, status.aliases) == (
        "qwen-small-q4",
        ModelState.LOADING,
        ("Qwen-Small",),
    )
    [plain] = mesh_model_statuses(ME, [], [], ["phi"], lambda s: names.get(s, s))
    assert plain.aliases == ()
