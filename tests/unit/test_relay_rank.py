"""Which linked nodes a stream to an unreachable node tries as relays, in which order."""

from __future__ import annotations

from mesh_llm.core.types import NodeId
from mesh_llm.net.relay import rank_relays
from mesh_llm.wire.messages import NodeRecord

A, B, C, T = (NodeId(c * 64) for c in "abct")


def test_nodes_that_link_the_target_come_first_and_the_target_is_never_its_own_relay() -> None:
    records = {
        A: NodeRecord(node_id=A, version=1),
        C: NodeRecord(node_id=C, version=1, rtt_ms={T: 3.0}),
    }
    assert rank_relays(T, [A, B, C, T], records.get) == [C, A, B]


def test_with_no_linked_node_there_is_no_relay() -> None:
    assert rank_relays(T, [], lambda _node: None) == []
