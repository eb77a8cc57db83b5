"""Builders for mesh-core unit tests: node ids, records, cores, and drains of their outputs."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

from mesh_llm.core.events import MeshCommand, MeshEvent
from mesh_llm.core.mesh import MeshCore, MeshTimings
from mesh_llm.wire.messages import Message, NodeRecord

TIMINGS = MeshTimings()


def nid(char: str) -> str:
    """A node id of 64 times `char`: ids compare like their characters ("1" < "2")."""
    return char * 64


def record(char: str, version: int = 1, **fields: Any) -> NodeRecord:
    base = NodeRecord(nid(char), version, name=f"node-{char}", addrs=(f"10.0.0.{ord(char)}:7842",))
    return replace(base, **fields)


def make_core(
    char: str, now: float = 0.0, timings: MeshTimings = TIMINGS, seed: int = 0, version: int = 1
) -> MeshCore:
    return MeshCore(record(char, version), timings, random.Random(seed), now)


def events(core: MeshCore) -> list[MeshEvent | MeshCommand]:
    out: list[MeshEvent | MeshCommand] = []
    while (event := core.next_event()) is not None:
        out.append(event)
    return out


def sent(core: MeshCore) -> list[tuple[str, Message]]:
    return core.outbox()


def sent_to(core: MeshCore, peer: str) -> list[Message]:
    return [msg for to, msg in core.outbox() if to == peer]


def linked(core: MeshCore, *chars: str, now: float = 0.0) -> MeshCore:
    """`core` with links to the nodes `chars`, outputs drained."""
    for char in chars:
        core.link_up(nid(char), now)
    core.outbox()
    events(core)
    return core


def pump(cores: dict[str, MeshCore], now: float, rounds: int = 50) -> None:
    """Deliver every queued message between `cores` instantly until none is left."""
    for _ in range(rounds):
        moved = False
        for sender, core in cores.items():
            for to, msg in core.outbox():
                if to in cores:
                    cores[to].receive(sender, msg, now)
                    moved = True
        if not moved:
            return
    raise AssertionError("messages still flowing after many rounds")
