"""A deterministic simulated network of `MeshCore` nodes for tier-1 simulation tests.

In memory and single-threaded: a discrete-event loop advances a fake clock to the earliest of the
nodes' deadlines, message arrivals and link set-ups, and drives each core exactly as the asyncio
shell does (input, then drain events, send the outbox, re-arm one timer). Messages get a random
delay and may be lost; a `DialPeer` becomes `link_up` on both sides after a dial delay; a
`ClosePeer` becomes `link_down` on the other side. A killed node stops processing while its links
stay "up" but silent. Every sent frame is encoded with the real codec to count bytes.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh_llm.core.events import ClosePeer, DialPeer, MeshCommand, MeshEvent
from mesh_llm.core.mesh import MeshCore, MeshTimings
from mesh_llm.wire.codec import encode_frame
from mesh_llm.wire.messages import Message, NodeRecord, Ping, Pong

_DELIVER, _TICK, _LINK_UP, _LINK_DOWN = range(4)


@dataclass(frozen=True, slots=True)
class NetConfig:
    """Delays in seconds; `loss` is the probability that one message is lost."""

    delay_s: tuple[float, float] = (0.001, 0.020)
    jitter_s: float | None = None
    """If set, each link gets a fixed base delay and each message adds up to this much jitter
    (still within `delay_s`); if None, every message draws its delay uniformly in `delay_s`."""
    loss: float = 0.0
    dial_delay_s: tuple[float, float] = (0.010, 0.030)


@dataclass(slots=True)
class Logged:
    time: float
    node: str
    event: MeshEvent | MeshCommand


@dataclass
class SimNetwork:
    size: int
    seed: int
    timings: MeshTimings = field(default_factory=MeshTimings)
    config: NetConfig = field(default_factory=NetConfig)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)
        self.now = 0.0
        self.ids = [f"{self.rng.getrandbits(256):064x}" for _ in range(self.size)]
        self.nodes = {
            node_id: MeshCore(
                NodeRecord(node_id, 1, name=f"n{i}", addrs=(f"10.0.{i // 250}.{i % 250}:7842",)),
                self.timings,
                random.Random(self.rng.getrandbits(64)),
                0.0,
            )
            for i, node_id in enumerate(self.ids)
        }
        self.alive = set(self.ids)
        self.links: set[frozenset[str]] = set()
        self.bytes_sent = dict.fromkeys(self.ids, 0)
        self.log: list[Logged] = []
        self.listeners: list[Callable[[Logged], None]] = []
        self._queue: list[tuple[float, int, int, str, str, Message | None]] = []
        self._seq = 0
        self._scheduled: dict[str, float | None] = dict.fromkeys(self.ids)
        self._base_delay: dict[tuple[str, str], float] = {}
        self._ping_sizes: dict[tuple[int, int], int] = {}

    # -- scenario controls ---------------------------------------------------------------------

    def connect(self, a: str, b: str, at: float | None = None) -> None:
        """Schedule a link between `a` and `b` (a join through a token, or a dial)."""
        self._push(self.now if at is None else at, _LINK_UP, a, b, None)

    def join_star(self, within_s: float = 1.0) -> None:
        """Every node joins through the first one (one invite token), at random times."""
        for node in self.ids[1:]:
            self.connect(node, self.ids[0], at=self.rng.uniform(0.0, within_s))

    def join_chain(self, within_s: float = 1.0) -> None:
        """Each node joins through the previous one: records must travel hop by hop."""
        for previous, node in zip(self.ids, self.ids[1:], strict=False):
            self.connect(node, previous, at=self.rng.uniform(0.0, within_s))

    def converged(self) -> bool:
        """Every live node holds a record of every live node, all with the same versions."""
        maps = [self.versions(node) for node in self.ids if node in self.alive]
        return set(maps[0]) == self.alive and all(m == maps[0] for m in maps[1:])

    def kill(self, node: str) -> None:
        """The process stops: no input, no output; its links stay up but silent."""
        self.alive.discard(node)

    def update(self, node: str, **changes: object) -> NodeRecord:
        record = self.nodes[node].update_self(self.now, **changes)
        self._flush(node)
        return record

    def run_until(self, end: float, stop: Callable[[], bool] | None = None) -> None:
        """Process everything due up to `end` (or until `stop()` holds after an input)."""
        while self._queue and self._queue[0][0] <= end:
            time, _, kind, a, b, msg = heapq.heappop(self._queue)
            self.now = time
            self._handle(kind, a, b, msg)
            if stop is not None and stop():
                return
        self.now = max(self.now, end)

    def versions(self, node: str) -> dict[str, int]:
        return {k: r.version for k, r in self.nodes[node].records().items()}

    # -- the loop ------------------------------------------------------------------------------

    def _push(self, time: float, kind: int, a: str, b: str, msg: Message | None) -> None:
        self._seq += 1
        heapq.heappush(self._queue, (time, self._seq, kind, a, b, msg))

    def _handle(self, kind: int, a: str, b: str, msg: Message | None) -> None:
        if kind == _DELIVER:
            if b in self.alive and frozenset((a, b)) in self.links:
                assert msg is not None
                self.nodes[b].receive(a, msg, self.now)
                self._flush(b)
        elif kind == _TICK:
            if a in self.alive and self._scheduled[a] == self.now:
                self._scheduled[a] = None
                self.nodes[a].tick(self.now)
                self._flush(a)
        elif kind == _LINK_UP:
            pair = frozenset((a, b))
            if a in self.alive and b in self.alive and pair not in self.links:
                self.links.add(pair)
                for here, there in ((a, b), (b, a)):
                    self.nodes[here].link_up(there, self.now)
                    self._flush(here)
        elif a in self.alive:  # _LINK_DOWN: `a` learns that its link to `b` closed
            self.nodes[a].link_down(b, self.now, "connection closed")
            self._flush(a)

    def _flush(self, node: str) -> None:
        """Drain `node` like the shell does: events, outbox, one timer."""
        core = self.nodes[node]
        while (event := core.next_event()) is not None:
            logged = Logged(self.now, node, event)
            self.log.append(logged)
            for listener in self.listeners:
                listener(logged)
            if isinstance(event, DialPeer):
                self._push(self.now + self.rng.uniform(*self.config.dial_delay_s), _LINK_UP,
                           node, event.node_id, None)  # fmt: skip
            elif isinstance(event, ClosePeer):
                self.links.discard(frozenset((node, event.node_id)))
                self._push(self.now + self._delay(node, event.node_id), _LINK_DOWN,
                           event.node_id, node, None)  # fmt: skip
        sizes: dict[int, int] = {}
        for peer, msg in core.outbox():
            size = sizes.get(id(msg))
            if size is None:
                size = sizes[id(msg)] = self._frame_size(msg)
            self.bytes_sent[node] += size
            if self.rng.random() >= self.config.loss:
                self._push(self.now + self._delay(node, peer), _DELIVER, node, peer, msg)
        deadline = core.next_deadline()
        if deadline is not None and deadline != self._scheduled[node]:
            deadline = max(deadline, self.now)
            self._scheduled[node] = deadline
            self._push(deadline, _TICK, node, node, None)

    def _frame_size(self, msg: Message) -> int:
        """Bytes of `msg` as a frame; a ping's size depends only on its seq's msgpack width."""
        if isinstance(msg, Ping | Pong):
            key = (msg.TAG, msg.seq.bit_length())
            size = self._ping_sizes.get(key)
            if size is None:
                size = self._ping_sizes[key] = len(encode_frame(msg))
            return size
        return len(encode_frame(msg))

    def _delay(self, src: str, dst: str) -> float:
        low, high = self.config.delay_s
        jitter = self.config.jitter_s
        if jitter is None:
            return self.rng.uniform(low, high)
        key = (src, dst) if src < dst else (dst, src)
        base = self._base_delay.get(key)
        if base is None:
            base = self._base_delay[key] = self.rng.uniform(low, high - jitter)
        return base + self.rng.uniform(0.0, jitter)
