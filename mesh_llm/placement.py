"""Placement shell: turns the pure plan into running backends on this node.

After every mesh or local change (debounced), `Placement` recomputes with the pure planner what
this node should run for the model it serves: solo llama-server, host of a split (llama-server
with `--rpc` pointing at local tunnel ports, one per worker, and `--tensor-split`), an rpc-server
worker in someone else's split, or nothing yet (waiting for VRAM, with the reason on the API).
It restarts llama-server only when the host or the worker set changed ("still host, no restart
needed" otherwise), and republishes this node's serving map so every node sees the same groups.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Protocol

from mesh_llm.backend.process import ChildState
from mesh_llm.backend.rpc_worker import RpcWorker
from mesh_llm.backend.serving import BinaryProvider, ModelServer, run_in_daemon_thread
from mesh_llm.config import Config
from mesh_llm.core.assignment import own_group_plan, worker_assignment
from mesh_llm.core.planner import (
    GroupPlan,
    ModelNeed,
    assign_model,
    plan_is_stable,
)
from mesh_llm.core.types import NodeId, short_id
from mesh_llm.models.gguf import estimate_kv_cache_bytes, read_gguf_info
from mesh_llm.wire.messages import NodeRecord, ServingInfo

log = logging.getLogger(__name__)


class Tunnels(Protocol):
    """Local ports that reach a worker's rpc-server through the mesh."""

    async def open(self, worker: NodeId) -> int: ...
    async def close(self, worker: NodeId) -> None: ...


class MeshView(Protocol):
    def records(self) -> list[NodeRecord]: ...
    def update_self(self, **changes: object) -> None: ...


class Placement:
    """Decides and applies this node's backends for its model (or as a standby worker)."""

    def __init__(
        self,
        node_id: NodeId,
        config: Config,
        mesh: MeshView,
        server: ModelServer | None,
        binaries: BinaryProvider,
        tunnels: Tunnels,
        make_server: Callable[[str], ModelServer] | None = None,
    ) -> None:
        self._id = node_id
        self._make_server = make_server
        self._said_standby = False
        self._said_still_host = False
        self._config = config
        self._mesh = mesh
        self._server = server
        self._binaries = binaries
        self._tunnels = tunnels
        self._changed = asyncio.Event()
        self._need: ModelNeed | None = None
        self._plan: GroupPlan | None = None
        self._serving: asyncio.Task[None] | None = None
        self._worker: RpcWorker | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self._worker_for: tuple[str, str] | None = None  # (model, host)
        self._worker_ready = False
        self._local_rpc: RpcWorker | None = None
        self._group: asyncio.TaskGroup | None = None
        self.rpc_port: int | None = None

    @property
    def plan(self) -> GroupPlan | None:
        """The group plan this node acts on (for status: host, workers, tensor split)."""
        return self._plan

    def notify(self) -> None:
        """Something changed in the mesh: re-plan soon."""
        self._changed.set()

    def on_local_change(self) -> None:
        """The local model server changed state: republish our serving map, re-plan."""
        self._publish()
        self._changed.set()

    async def run(self) -> None:
        async with asyncio.TaskGroup() as group:
            self._group = group
            if self._server is not None and await self._server.prepare() is not None:
                self._need = await run_in_daemon_thread(self._measure_need)
                self._publish()
            elif self._server is None:
                # A standby node is a worker candidate: hosts pair only matching RPC protocols.
                binaries = await self._binaries.get()
                self._mesh.update_self(
                    build_id=binaries.build_id, rpc_protocol=binaries.rpc_protocol
                )
            while True:
                await self._changed.wait()
                await asyncio.sleep(self._config.replan_debounce_s)
                self._changed.clear()
                await self._replan()

    def rpc_pids(self) -> list[int]:
        """The pids of this node's rpc-servers (a worker's, the host's own), for a forced exit."""
        workers = (self._worker, self._local_rpc)
        return [w.supervisor.pid for w in workers if w is not None and w.supervisor.pid is not None]

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop()
        if self._worker is not None:
            await self._worker.stop()
        if self._local_rpc is not None:
            await self._local_rpc.stop()

    # -- planning -------------------------------------------------------------------------

    def _measure_need(self) -> ModelNeed:
        assert self._server is not None and self._server.model is not None
        model = self._server.model
        info = read_gguf_info(model.path)
        kv = estimate_kv_cache_bytes(info, self._config.backend.ctx_size)
        return ModelNeed(model.name, model.size_bytes, kv)

    def _records(self) -> dict[str, NodeRecord]:
        return {r.node_id: r for r in self._mesh.records()}

    async def _replan(self) -> None:
        records = self._records()
        await self._apply_worker_role(records)
        if self._server is None and self._worker_for is None:
            await self._maybe_assign(records)
        if self._server is None or self._need is None or self._server.model is None:
            return
        if self._worker_for is not None:
            return  # a worker in another host's split does not serve its own copy
        plan = self._plan_own_group(records)
        await self._apply_host_role(plan, records)

    async def _maybe_assign(self, records: Mapping[str, NodeRecord]) -> None:
        """A node without --model takes a wanted, unserved model it has on disk."""
        if self._make_server is None or len(records) < 2:
            return
        choice = assign_model(self._id, records, self._config.planner)
        if choice is None:
            if not self._said_standby:
                log.info("No unserved model fits — standing by as a worker")
                self._said_standby = True
            return
        log.info(
            "Assigned to serve %s (needed by mesh, already on disk)",
            choice,
            extra={"event": "assigned", "model": choice},
        )
        self._server = self._make_server(choice)
        self._mesh.update_self(role="serving")
        if await self._server.prepare() is not None:
            self._need = await run_in_daemon_thread(self._measure_need)
            self._publish()

    def _plan_own_group(self, records: Mapping[str, NodeRecord]) -> GroupPlan:
        assert self._need is not None
        return own_group_plan(self._id, self._need, records, self._config.planner)

    async def _apply_host_role(self, plan: GroupPlan, records: Mapping[str, NodeRecord]) -> None:
        assert self._server is not None
        if plan.host != self._id:
            if self._plan is not None and self._plan.host == self._id:
                await self._stop_serving()
            self._plan = plan
            self._server.wait(f"node {short_id(NodeId(plan.host or '?'))} hosts this model")
            return
        if plan.waiting:
            if self._plan is None or self._plan.waiting != plan.waiting:
                log.info("%s", plan.waiting, extra={"event": "waiting_for_vram"})
            await self._stop_serving()
            self._plan = plan
            self._server.wait(plan.waiting)
            return
        not_ready = [w for w in plan.workers if not _worker_ready(records, w, plan.model, self._id)]
        if not_ready:
            await self._stop_serving()
            self._plan = plan  # published as host, so the chosen workers start their rpc-server
            self._server.wait(f"waiting for rpc workers {', '.join(w[:10] for w in not_ready)}")
            return
        if (
            self._plan is not None
            and self._serving is not None
            and plan_is_stable(self._plan, plan)
        ):
            # INFO once per launch (a person checks it after a re-election), DEBUG after that.
            level = logging.DEBUG if self._said_still_host else logging.INFO
            log.log(level, "still host, no restart needed", extra={"event": "still_host"})
            self._said_still_host = True
            return
        await self._stop_serving()
        endpoints = [f"127.0.0.1:{await self._tunnels.open(NodeId(w))}" for w in plan.workers]
        if plan.workers and self._records()[self._id].backend == "cpu":
            # A CPU host has no offload device of its own: its share of the split goes to a
            # local rpc-server listed last, matching the planner's device order. Last, so it
            # holds the output layer and the logits (~1 MB a token at a 262k vocabulary) never
            # cross the network. Measured faster than keeping the share on llama-server's CPU
            # with -ngl (which offloads the output layer to the worker) or with -ot
            # (tests/bench/bench_split.py).
            endpoints.append(f"127.0.0.1:{await self._local_rpc_port()}")
        self._said_still_host = False
        log.info(
            "host of %s: %s",
            plan.model,
            f"split over {len(plan.workers)} worker(s), tensor split {plan.tensor_split}"
            if plan.workers
            else "solo",
            extra={"event": "election", "workers": len(plan.workers)},
        )
        self._plan = plan
        assert self._group is not None
        self._serving = self._group.create_task(
            self._server.serve(tuple(endpoints), plan.tensor_split)
        )
        self._publish()

    async def _local_rpc_port(self) -> int:
        if self._local_rpc is None:
            binaries = await self._binaries.get()
            ready = asyncio.Event()

            def on_state(state: ChildState, _detail: str) -> None:
                if state is ChildState.READY:
                    ready.set()

            self._local_rpc = RpcWorker(self._config, binaries, on_state)
            assert self._group is not None
            self._group.create_task(self._local_rpc.run())
            async with asyncio.timeout(self._config.rpc_start_timeout_s):
                await ready.wait()
        return self._local_rpc.port

    async def _stop_serving(self) -> None:
        if self._serving is None:
            return
        assert self._server is not None
        await self._server.stop()
        self._serving.cancel()
        # Wait for it to end without taking its outcome (the TaskGroup does): a cancel of
        # Placement itself still propagates from here.
        await asyncio.wait([self._serving])
        self._serving = None
        if self._plan is not None:
            for worker in self._plan.workers:
                await self._tunnels.close(NodeId(worker))

    async def _apply_worker_role(self, records: Mapping[str, NodeRecord]) -> None:
        """Am I a worker in some host's plan? Then run rpc-server (once)."""
        wanted = self._worker_assignment(records)
        if wanted == self._worker_for:
            return
        if wanted is None:
            log.info("no longer an rpc worker", extra={"event": "worker_stopped"})
            if self._worker is not None:
                await self._worker.stop()
            self._worker = None
            self._worker_for = None
            self.rpc_port = None
            self._publish()
            return
        if self._worker is None:
            binaries = await self._binaries.get()
            self._worker = RpcWorker(self._config, binaries, self._on_worker_state)
            self.rpc_port = self._worker.port
            assert self._group is not None
            self._worker_task = self._group.create_task(self._worker.run())
        if self._server is not None and self._serving is not None:
            await self._stop_serving()
        self._worker_for = wanted
        log.info(
            "rpc worker for %s hosted by %s",
            wanted[0],
            short_id(NodeId(wanted[1])),
            extra={"event": "worker_assigned"},
        )
        self._publish()

    def _worker_assignment(self, records: Mapping[str, NodeRecord]) -> tuple[str, str] | None:
        return worker_assignment(self._id, records, self._need, self._config.planner)

    def _on_worker_state(self, state: ChildState, detail: str) -> None:
        self._worker_ready = state is ChildState.READY
        self._publish()

    # -- publishing -----------------------------------------------------------------------

    def _publish(self) -> None:
        serving: dict[str, ServingInfo] = {}
        if self._worker_for is not None:
            model, host = self._worker_for
            serving[model] = ServingInfo("worker", self._worker_ready, host)
        elif self._server is not None and self._server.model is not None:
            ready = self._server.status.state.value == "ready"
            plan = self._plan
            host = plan.host if plan is not None and plan.host else self._id
            role = "host" if plan is not None and host == self._id else "loading"
            aliases = self._server.status.aliases
            capabilities = tuple(c.value for c in self._server.status.capabilities)
            serving[self._server.model.name] = ServingInfo(role, ready, host, aliases, capabilities)
        split = (
            (self._server.model.name,)
            if self._config.backend.split and self._server is not None and self._server.model
            else ()
        )
        self._mesh.update_self(serving=serving, split_models=split)


def _worker_ready(records: Mapping[str, NodeRecord], worker: str, model: str, host: str) -> bool:
    info = records.get(worker, _EMPTY).serving.get(model)
    return info is not None and info.role == "worker" and info.ready and info.host == host


_EMPTY = NodeRecord(node_id="", version=0)
