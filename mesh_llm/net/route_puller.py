"""The passive client's view of the mesh: the routing table it pulls, the hosts it dials.

A passive client (`--client`) is no mesh member: it links to one node from its invite token
and pulls the routing table (the serving nodes' records) from it with a `ROUTES` stream — on
connect, every `route_refresh_s` and on every change notice that node sends. API requests to a
host need a QUIC connection to it: `connection_for` dials the host on demand (its address from
the routing table) and keeps the connection while it lives; several requests waiting for the
same dial share it. Every task (refreshes, on-demand dials, the reads that hold their links)
belongs to the TaskGroup of `run()`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from mesh_llm.config import NetConfig
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.errors import DecodeError, MeshError, PeerUnavailable, StreamReset
from mesh_llm.net.hello import FramedChannel
from mesh_llm.net.links import Link
from mesh_llm.net.quic import QuicPeerConnection
from mesh_llm.tasks import OwnedTasks
from mesh_llm.wire.messages import NodeRecord, RefuseCode, RouteReply, RouteRequest, StreamType

log = logging.getLogger(__name__)

Dial = Callable[[tuple[str, ...], NodeId], Awaitable[Link]]


@dataclass(slots=True)
class RouteTable:
    """What a passive client knows of the mesh: the serving nodes' records."""

    records: tuple[NodeRecord, ...] = ()
    source: NodeId | None = None
    updated_at: float = 0.0


class RoutePuller:
    """Pulls the routing table over the client's link and dials hosts on demand."""

    def __init__(self, dial: Dial, timings: NetConfig, on_change: Callable[[], None]) -> None:
        self._dial = dial
        self._timings = timings
        self._on_change = on_change
        self.routes = RouteTable()
        self._source: Link | None = None  # the link the table comes from
        self._tasks = OwnedTasks()
        self._on_demand: dict[NodeId, asyncio.Task[Link | MeshError]] = {}

    async def run(self) -> None:
        """Own the refresh and on-demand tasks until cancelled."""
        await self._tasks.hold()

    def is_linked(self, node_id: NodeId) -> bool:
        """A live on-demand connection to `node_id` exists."""
        task = self._on_demand.get(node_id)
        return task is not None and task.done() and not _dead_link(task)

    async def joined(self, link: Link) -> None:
        """The client linked to a node of its token: pull now, then every `route_refresh_s`."""
        self._source = link
        await self.refresh(link)
        group = self._tasks.group
        if group is not None:
            group.create_task(self._refresh_periodically(link))

    async def refresh(self, link: Link) -> None:
        """Ask `link`'s node for its routing table (a failure is logged; the old one stays)."""
        try:
            async with asyncio.timeout(self._timings.route_request_timeout_s):
                channel = FramedChannel(await link.connection.open_stream(StreamType.ROUTES))
                channel.send(RouteRequest())
                reply = await channel.receive()
        except (TimeoutError, StreamReset, DecodeError) as exc:
            log.info("route refresh from %s failed: %r", short_id(link.node_id), exc)
            return
        if isinstance(reply, RouteReply):
            self.routes = RouteTable(reply.records, link.node_id, asyncio.get_running_loop().time())
            self._on_change()

    async def _refresh_periodically(self, link: Link) -> None:
        while not link.connection.is_closed:
            await asyncio.sleep(self._timings.route_refresh_s)
            await self.refresh(link)

    async def connection_for(self, peer: NodeId) -> QuicPeerConnection:
        """An admitted connection to host `peer`, dialled on demand; raises `PeerUnavailable`."""
        task = self._on_demand.get(peer)
        if task is None or (task.done() and _dead_link(task)):
            record = next((r for r in self.routes.records if r.node_id == peer), None)
            if record is None:
                raise PeerUnavailable(f"{short_id(peer)} is not in the routing table")
            group = self._tasks.group
            if group is None:
                raise PeerUnavailable("the mesh is not running")
            task = group.create_task(self._dial_on_demand(record))
            self._on_demand[peer] = task
        # Shielded: one caller going away must not cancel a dial others wait for too.
        outcome = await asyncio.shield(task)
        if isinstance(outcome, MeshError):
            self._on_demand.pop(peer, None)
            raise outcome
        return outcome.connection

    def report_failure(self, peer: NodeId) -> None:
        """A request to `peer` failed: close its on-demand link and pull the table again."""
        task = self._on_demand.pop(peer, None)
        if task is not None and task.done() and not _dead_link(task):
            link = task.result()
            assert isinstance(link, Link)
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "request failed")
        source, group = self._source, self._tasks.group
        if source is not None and not source.connection.is_closed and group is not None:
            group.create_task(self.refresh(source))

    async def _dial_on_demand(self, record: NodeRecord) -> Link | MeshError:
        """A task of the group: its failure is its result (for the callers), not the group's."""
        try:
            link = await self._dial(record.addrs, NodeId(record.node_id))
        except MeshError as exc:
            return exc
        group = self._tasks.group
        if group is not None:
            group.create_task(self._hold(link))
        return link

    async def _hold(self, link: Link) -> None:
        """Read the on-demand link's control stream (change notices) until it closes."""
        try:
            while await link.channel.receive() is not None:
                pass
        except (DecodeError, StreamReset):
            pass
        finally:
            task = self._on_demand.get(link.node_id)
            if task is not None and task.done() and _dead_link(task):
                self._on_demand.pop(link.node_id, None)
            link.connection.close_with(RefuseCode.SHUTTING_DOWN, "on-demand link ended")


def _dead_link(task: asyncio.Task[Link | MeshError]) -> bool:
    """A finished on-demand dial whose link is unusable (failed, or closed since)."""
    if task.cancelled() or task.exception() is not None:
        return True
    outcome = task.result()
    return isinstance(outcome, MeshError) or outcome.connection.is_closed
