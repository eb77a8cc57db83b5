"""An admitted peer that misbehaves: its lies are ignored or capped, honest nodes' view unchanged.

Node 1 (under test) is linked with honest node 2 and with node 3, which sends forged records for
node 2, absurd values, replays of old versions, and `leaving` notices for node 2. The wire codec
refuses oversized content before the core sees it (10^5 models, huge strings).
"""

from __future__ import annotations

from dataclasses import replace

import msgpack  # type: ignore[import-untyped]
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh_llm.core.events import PeerLeft
from mesh_llm.core.mesh import MAX_VRAM_BYTES, MeshCore
from mesh_llm.errors import DecodeError
from mesh_llm.wire.codec import MAX_ITEMS, MAX_STRING_BYTES, decode_message
from mesh_llm.wire.messages import Leaving, NodeRecord, Records, Want

from .helpers import events, linked, make_core, nid, record, sent_to

HONEST = nid("2")
LIAR = nid("3")


def _mesh() -> tuple[MeshCore, NodeRecord]:
    core = linked(make_core("1"), "2", "3")
    honest = record("2", 5, vram_bytes=8 * 2**30, models_on_disk={"m": 100})
    core.receive(HONEST, Records((honest,)), 0.0)
    core.receive(LIAR, Records((record("3", 1),)), 0.0)
    events(core)
    core.outbox()
    return core, honest


def test_a_forged_record_for_a_linked_node_is_not_stored_but_checked_with_it() -> None:
    core, honest = _mesh()
    forged = replace(honest, version=99, vram_bytes=1, addrs=("6.6.6.6:1",))
    core.receive(LIAR, Records((forged,)), 1.0)
    assert core.records()[HONEST] == honest
    assert Want((HONEST,)) in sent_to(core, HONEST)  # ask the node itself
    assert events(core) == []


def test_a_relayed_record_of_an_unlinked_node_is_still_gossip() -> None:
    core, _ = _mesh()
    far = record("4", 7)
    core.receive(LIAR, Records((far,)), 1.0)
    assert core.records()[nid("4")] == far  # no way to tell: dial it and hear it directly


def test_absurd_vram_is_capped() -> None:
    core, _ = _mesh()
    core.receive(LIAR, Records((record("3", 2, vram_bytes=10**18),)), 1.0)
    assert core.records()[LIAR].vram_bytes == MAX_VRAM_BYTES
    core.receive(LIAR, Records((record("4", 1, vram_bytes=2**63 - 1),)), 1.0)
    assert core.records()[nid("4")].vram_bytes == MAX_VRAM_BYTES


def test_a_replayed_old_version_is_ignored() -> None:
    core, _ = _mesh()
    core.receive(LIAR, Records((record("3", 9, name="new"),)), 1.0)
    core.receive(LIAR, Records((record("3", 2, name="old"),)), 2.0)
    core.receive(LIAR, Records((record("3", 9, name="same version, other content"),)), 2.0)
    assert core.records()[LIAR].name == "new"


def test_leaving_for_another_linked_node_is_ignored() -> None:
    core, honest = _mesh()
    core.receive(LIAR, Leaving(HONEST), 1.0)
    assert core.records()[HONEST] == honest
    assert HONEST in core.linked_peers()
    assert not any(isinstance(e, PeerLeft) for e in events(core))
    core.receive(HONEST, Leaving(HONEST), 2.0)  # the node itself: believed at once
    assert HONEST not in core.records()
    assert any(isinstance(e, PeerLeft) for e in events(core))


def _records_payload(record_map: dict[str, object]) -> bytes:
    document = {"t": Records.TAG, "records": [record_map]}
    payload: bytes = msgpack.packb(document, use_bin_type=True)
    return payload


@pytest.mark.parametrize(
    "field",
    [
        {"models_on_disk": {f"model-{i}": 1 for i in range(10**5)}},
        {"requested_models": [f"model-{i}" for i in range(MAX_ITEMS + 1)]},
        {"name": "x" * (MAX_STRING_BYTES + 1)},
    ],
    ids=["1e5-models", "too-many-requested", "huge-name"],
)
def test_oversized_record_content_never_decodes(field: dict[str, object]) -> None:
    with pytest.raises(DecodeError):
        decode_message(_records_payload({"node_id": LIAR, "version": 2, **field}))


_node = st.sampled_from([nid("2"), nid("3"), nid("4"), nid("1")])
_lie = st.builds(
    lambda node, version, vram, name: record(node[0], version, vram_bytes=vram, name=name),
    _node,
    st.integers(0, 2**40),
    st.integers(0, 2**63 - 1),
    st.text(max_size=20),
)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(_lie.map(lambda r: Records((r,))), _node.map(Leaving)), max_size=20))
def test_whatever_the_liar_sends_the_honest_view_holds(
    messages: list[Records | Leaving],
) -> None:
    core, honest = _mesh()
    for step, message in enumerate(messages):
        core.receive(LIAR, message, 1.0 + step)
    assert core.records()[HONEST] == honest
    assert HONEST in core.linked_peers()
    assert core.records()[nid("1")].node_id == nid("1")
    assert all(r.vram_bytes <= MAX_VRAM_BYTES for r in core.records().values())
