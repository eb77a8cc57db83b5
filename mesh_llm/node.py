"""The composition root: builds a node from a `Config` and runs it until shutdown.

Startup order: sweep children left by a dead node → decode join tokens →
identity → mesh secret (the token's, or this seeder's own) → bind the QUIC port → print the
invite token → console (management) and API servers up (503 until a model is ready) → mesh
(gossip, joining) and the local model server (resolve, llama.cpp, llama-server). Shutdown:
refuse new API requests (503), let the ones in flight — local and those served for other
nodes — finish within `shutdown_grace_s` (`api/drain.py`), tell the mesh we leave, stop
children, return. Every task lives in one TaskGroup owned by
`Node.run`; the shutdown trigger is an injected `asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from aiohttp import web

from mesh_llm import __version__
from mesh_llm.api.app import INBOUND_KEY, PROXY_KEY, create_app
from mesh_llm.api.auth import warn_if_exposed
from mesh_llm.api.console import create_console_app
from mesh_llm.api.console_view import record_fields
from mesh_llm.api.drain import Drain, drain_middleware
from mesh_llm.api.inbound import DROP_PATH
from mesh_llm.api.metrics import MetricSources
from mesh_llm.api.openai import PROXIED_PATHS, error_body
from mesh_llm.api.operations import http_limits
from mesh_llm.api.proxy import Proxy
from mesh_llm.api.upstream import UpstreamFailed, open_remote, request_head
from mesh_llm.backend.hardware import HardwareInfo, detect_hardware, max_vram_bytes
from mesh_llm.backend.llama import LOOPBACK
from mesh_llm.backend.process import kill_process_group_now, sweep_stale_children
from mesh_llm.backend.serving import (
    BinaryProvider,
    ModelServer,
    model_name_of,
    run_in_daemon_thread,
)
from mesh_llm.config import Config
from mesh_llm.core.demand import DemandMeter, rates_changed
from mesh_llm.core.mesh import MeshCore
from mesh_llm.core.model_statuses import mesh_model_statuses
from mesh_llm.core.router import ModelStatus
from mesh_llm.core.types import NodeId
from mesh_llm.errors import ConfigError, MeshError, PeerUnavailable
from mesh_llm.identity import (
    MeshSecret,
    NodeIdentity,
    load_or_create_identity,
    load_or_create_mesh,
)
from mesh_llm.models.resolve import list_local_models
from mesh_llm.net.fastlane import FastLaneServer
from mesh_llm.net.http_peer import HttpPeerClient, PeerResponse
from mesh_llm.net.peers import PeerManager
from mesh_llm.net.transport import PeerTransport, StreamHandlers, start_fast_lane_server
from mesh_llm.net.tunnel import RpcTunnels, rpc_worker_handler
from mesh_llm.placement import Placement
from mesh_llm.token import InviteToken, decode_token, encode_token, format_addr
from mesh_llm.wire.messages import HttpRequestHead, NodeRecord, Role, StreamType

log = logging.getLogger(__name__)

Announce = Callable[[str], None]


class Node:
    """One mesh-llm process: mesh links, API, console, local model; `run()` until shutdown."""

    def __init__(self, config: Config, *, announce: Announce | None = None) -> None:
        if config.client and config.models:
            raise ConfigError("--client serves no model: drop --model, or drop --client")
        if config.client and not config.join:
            raise ConfigError("--client needs --join TOKEN (the mesh to use)")
        self._config = config
        self._announce = announce or (lambda line: log.info("%s", line))
        self._tokens = tuple(decode_token(text) for text in config.join)
        if len({t.mesh_id for t in self._tokens}) > 1:
            raise ConfigError("the --join tokens belong to different meshes")
        self._binaries = BinaryProvider(config)
        self._servers = [
            ModelServer(spec, config, self._binaries, self._on_local_change)
            for spec in config.models[:1]
        ]
        self._placement: Placement | None = None
        self._wanted = config.models[1:]
        self.identity: NodeIdentity | None = None
        self.peers: PeerManager | None = None
        self.token: str | None = None
        self._hardware: HardwareInfo | None = None
        self._tunnels: RpcTunnels | None = None
        self._fast_lane: FastLaneServer | None = None
        self._handlers = StreamHandlers()  # who answers other nodes' RPC and HTTP streams
        self._transport: PeerTransport | None = None
        self._http: HttpPeerClient | None = None  # API requests to other hosts
        self.api_url = f"http://{config.api.host}:{config.api.port}/v1"
        self._shutdown: asyncio.Event | None = None
        self._proxy: Proxy | None = None  # the API's router, shared by the console's chat
        self._demand = DemandMeter()
        self._drain = Drain()  # API requests in flight, local and for other nodes

    # -- ModelDirectory (API) and StatusSource (console) ---------------------------------

    def model_statuses(self) -> Sequence[ModelStatus]:
        """Every model this node serves, the mesh serves, or the mesh wants, with the remote
        hosts serving each one ready (the router's input)."""
        local = [server.status for server in self._servers]
        return mesh_model_statuses(
            self._node_id(), self._known_records(), local, self._wanted, model_name_of
        )

    # -- MeshAccess (API proxy) ---------------------------------------------------------

    async def send_request(
        self, node_id: str, head: HttpRequestHead, body: bytes, first_byte_timeout_s: float
    ) -> PeerResponse:
        if self._http is None:
            raise PeerUnavailable("the mesh is not up yet")
        return await self._http.request(NodeId(node_id), head, body, first_byte_timeout_s)

    def report_failure(self, node_id: str, reason: str) -> None:
        if self._http is not None:
            self._http.forget(NodeId(node_id))
        if self.peers is not None:
            self.peers.report_failure(node_id, reason)

    def count_request(self, model: str) -> None:
        self._demand.observe(model, time.monotonic())

    async def drop(self, model: str) -> tuple[int, dict[str, Any]]:
        """`mesh-llm drop`: the node(s) serving `model` leave the mesh; this one forwards."""
        local = await self.drop_local(model)
        if local[0] != 404:
            return local
        status = next((m for m in self.model_statuses() if m.name == model), None)
        if status is None or not status.remote:
            return local
        dropped: list[str] = []
        errors: list[str] = []
        for node_id in status.remote:
            try:
                body = json.dumps({"model": model}).encode()
                head = request_head(DROP_PATH, body, uuid.uuid4().hex)
                upstream = await open_remote(self, node_id, head, body, self._config.api)
                try:
                    async for _chunk in upstream.chunks():
                        pass
                finally:
                    upstream.close()
            except (MeshError, UpstreamFailed) as exc:
                errors.append(f"{node_id[:10]}: {exc}")
                continue
            if upstream.status == 200:
                dropped.append(node_id[:10])
            else:
                errors.append(f"{node_id[:10]} answered {upstream.status}")
        if not dropped:
            return 502, error_body(
                502, f"could not drop {model}: {'; '.join(errors)}", "drop_failed"
            )
        return 200, {"dropped": model, "nodes": dropped, "errors": errors}

    async def drop_local(self, model: str) -> tuple[int, dict[str, Any]]:
        """Drop `model` if this node serves it: answer, then leave the mesh and exit 0."""
        served = [s.status for s in self._servers]
        if any(model == s.name or model in s.aliases for s in served):
            log.info("dropping %s: leaving the mesh", model, extra={"event": "drop"})
            if self._shutdown is not None:
                asyncio.get_running_loop().call_later(
                    self._config.drop_exit_delay_s, self._shutdown.set
                )
            short = self.identity.short_id if self.identity else ""
            return 200, {"dropped": model, "nodes": [short]}
        names = sorted({m.name for m in self.model_statuses() if m.routable})
        message = f"no node serves {model!r}; served models: {', '.join(names) or 'none'}"
        return 404, error_body(404, message, "model_not_found")

    def status(self) -> dict[str, Any]:
        config = self._config
        hardware = self._hardware
        binaries = self._binaries.binaries
        snapshot = self.peers.snapshot() if self.peers is not None else {"peers": [], "clients": 0}
        return {
            "node": {
                "node_id": self._node_id(),
                "short_id": self.identity.short_id if self.identity else "",
                "name": socket.gethostname(),
                "role": self._role(),
                "client": config.client,
                "api_url": self.api_url,
                "mesh_port": self.peers.port if self.peers is not None else None,
                "vram_bytes": hardware.vram_bytes if hardware else 0,
                "backend": hardware.backend if hardware else "",
                "build_id": binaries.build_id if binaries else "",
                "rpc_protocol": binaries.rpc_protocol if binaries else "",
                "version": __version__,
                "draining": self._drain.draining,
            },
            "token": self.token,
            "is_host": self._is_host(),
            "models": [
                {
                    "name": m.name,
                    "state": m.state.value,
                    "reason": m.reason,
                    "host": m.host,
                    "nodes": m.node_count,
                    "remote_hosts": list(m.remote),
                }
                for m in self.model_statuses()
            ],
            "peers": snapshot["peers"],
            "clients": snapshot["clients"],
            "fast_lane_port": self._fast_lane.port if self._fast_lane is not None else None,
            "rpc_tunnels": self._tunnels.snapshot() if self._tunnels is not None else [],
            "api_lanes": self._http.snapshot() if self._http is not None else None,
            # For the console's view: every gossip record as advertised, the context size,
            # and the split this node hosts (if any).
            "records": [record_fields(r) for r in self._known_records()],
            "ctx_size": config.backend.ctx_size,
            "split": self._split_status(),
        }

    def _split_status(self) -> dict[str, Any] | None:
        plan = self._placement.plan if self._placement is not None else None
        if plan is None or not plan.workers:
            return None
        return {"model": plan.model, "host": plan.host, "tensor_split": list(plan.tensor_split)}

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run the node until `shutdown` is set; raises `MeshError` for fatal start-up errors."""
        config = self._config
        self._shutdown = shutdown
        await asyncio.to_thread(sweep_stale_children, config.run_dir)
        self.identity = await asyncio.to_thread(
            load_or_create_identity,
            config.key_path,
            ephemeral=config.ephemeral_key or config.client,
        )
        mesh = await self._mesh_secret()
        core = None
        if not config.client:
            cap = max_vram_bytes(config)
            self._hardware = await run_in_daemon_thread(lambda: detect_hardware(max_vram_bytes=cap))
            core = MeshCore(await self._initial_record(), config.mesh, random.Random(), _now())
        self.peers = PeerManager(
            self.identity,
            mesh,
            core,
            tokens=self._tokens,
            timings=config.net,
            inbound=self._handlers.accept,
        )
        port = await self.peers.bind(config.net.bind_host, config.net.bind_port)
        self._transport, self._http = self._peer_transport(self.peers)
        addrs = (*config.net.advertise, *(format_addr(ip, port) for ip in _local_addresses()))
        if core is not None:
            await self._start_fast_lane()
            self.peers.update_self(addrs=addrs)
            self.token = encode_token(
                InviteToken(mesh.mesh_id, mesh.secret, self.identity.node_id, addrs)
            )
            self._announce(f"Node {self.identity.short_id} — invite token:\n{self.token}")
        runners = [await self._start_console()]
        try:
            runners.append(await self._start_api())
            await self._run_tasks(shutdown, runners, serving=core is not None)
        except ExceptionGroup as failed:  # a task of the node failed: one error for the CLI
            raise _one_error(failed) from failed
        finally:
            for runner in runners:
                await runner.cleanup()
        log.info("node stopped", extra={"event": "node_stopped"})

    async def _run_tasks(
        self, shutdown: asyncio.Event, runners: list[web.AppRunner], *, serving: bool
    ) -> None:
        """The node's tasks (mesh, placement, demand) until `shutdown`, then the stop order:
        drain the API requests in flight, leave the mesh, stop children and lanes."""
        assert self.identity is not None and self.peers is not None
        assert self._http is not None
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(self.peers.run()), group.create_task(self._http.run())]
            if self._fast_lane is not None and self._tunnels is not None:
                tasks.append(group.create_task(self._fast_lane.run()))
                tasks.append(group.create_task(self._tunnels.run()))
            if serving:
                assert self._tunnels is not None  # made with the fast lane
                self._placement = Placement(
                    self.identity.node_id,
                    self._config,
                    self.peers,
                    self._servers[0] if self._servers else None,
                    self._binaries,
                    self._tunnels,
                    make_server=self._assigned_server,
                )
                self.peers.listeners.on_change.append(self._placement.notify)
                tasks.append(group.create_task(self._placement.run()))
                tasks.append(group.create_task(self._publish_demand()))
            await shutdown.wait()
            self._binaries.cancel.set()
            await self._drain_requests()
            await self.peers.leave()
            for runner in runners:
                for site in list(runner.sites):
                    await site.stop()
            if self._placement is not None:
                await self._placement.stop()
            for task in tasks:  # lanes, tunnels, links: each ends what it owns
                task.cancel()

    async def _drain_requests(self) -> None:
        """Refuse new API requests (503) and let the ones in flight — this node's clients' and
        other nodes' — finish within `shutdown_grace_s`, while the mesh links and the model
        servers they need are still up."""
        drain, grace_s = self._drain, self._config.shutdown_grace_s
        drain.start()
        log.info(
            "shutting down: %d request(s) in flight get up to %.0f s",
            drain.active,
            grace_s,
            extra={"event": "node_stopping", "in_flight": drain.active},
        )
        if not await drain.wait_idle(grace_s):
            log.warning(
                "shutdown grace over: %d request(s) still in flight are cut",
                drain.active,
                extra={"event": "drain_expired", "in_flight": drain.active},
            )

    async def _publish_demand(self) -> None:
        """Gossip this node's request rates per model when they changed noticeably."""
        published: dict[str, float] = {}
        while True:
            await asyncio.sleep(self._config.demand_publish_interval_s)
            rates = self._demand.rates(time.monotonic())
            if self.peers is not None and rates_changed(published, rates):
                self.peers.update_self(demand=rates)
                published = rates

    def kill_children_now(self) -> None:
        """Forced exit path (second signal): SIGKILL every child at once."""
        pids = [s.supervisor.pid for s in self._servers if s.supervisor is not None]
        if self._placement is not None:
            pids += self._placement.rpc_pids()
        for pid in pids:
            if pid is not None:
                kill_process_group_now(pid)

    # -- helpers --------------------------------------------------------------------------

    def _peer_transport(self, peers: PeerManager) -> tuple[PeerTransport, HttpPeerClient]:
        """How this node reaches peers, and its pool for API requests to other hosts."""
        assert self.identity is not None
        net = self._config.net
        fast = {StreamType.RPC} | ({StreamType.HTTP} if net.api_fast_lane else set())
        transport = PeerTransport(
            self.identity,
            peers,
            fast_lane_purposes=frozenset(fast),
            connect_timeout_s=net.fast_lane_connect_timeout_s,
            fast_lane_retry_s=net.fast_lane_retry_s,
        )
        client = HttpPeerClient(
            transport,
            pool_idle_s=net.http_pool_idle_s,
            pool_max_idle=net.http_pool_max_idle,
            finish_s=net.http_finish_s,
        )
        return transport, client

    async def _start_fast_lane(self) -> None:
        """RPC tunnels to workers, the fast-lane server that other nodes dial, and the RPC
        stream handler of a worker (over either lane)."""
        assert self.identity is not None and self.peers is not None
        assert self._transport is not None
        net, peers = self._config.net, self.peers
        self._tunnels = RpcTunnels(self._transport)
        self._fast_lane = await start_fast_lane_server(
            self.identity,
            net.bind_host,
            net.fast_lane_port,
            peers.is_admitted,
            self._handlers,
            net,
        )
        self._handlers.serve(StreamType.RPC, rpc_worker_handler(self._rpc_port))
        peers.update_self(fast_lane_port=net.fast_lane_advertise_port or self._fast_lane.port)

    def _rpc_port(self) -> int | None:
        """The port of this node's rpc-server while it is a worker (else None)."""
        return self._placement.rpc_port if self._placement is not None else None

    def _node_id(self) -> str:
        return self.identity.node_id if self.identity else ""

    def _linked_peers(self) -> int:
        snapshot = self.peers.snapshot() if self.peers is not None else {"peers": []}
        return sum(1 for peer in snapshot["peers"] if peer["linked"])

    def _tunnel_bytes(self) -> dict[tuple[str, str], int]:
        """RPC tunnel bytes per (worker, direction) for `/metrics`."""
        snapshot = self._tunnels.snapshot() if self._tunnels is not None else []
        counts: dict[tuple[str, str], int] = {}
        for tunnel in snapshot:
            counts[(tunnel["short_id"], "up")] = tunnel["bytes_up"]
            counts[(tunnel["short_id"], "down")] = tunnel["bytes_down"]
        return counts

    def _metric_sources(self) -> MetricSources:
        return MetricSources(peer_count=self._linked_peers, tunnel_bytes=self._tunnel_bytes)

    def _is_host(self) -> bool:
        """This node hosts a model (solo or a split) in its own published serving map."""
        own = next((r for r in self._known_records() if r.node_id == self._node_id()), None)
        return own is not None and any(
            info.role == "host" and info.host == own.node_id for info in own.serving.values()
        )

    def _role(self) -> str:
        if self._config.client:
            return Role.CLIENT.value
        return Role.SERVING.value if self._servers else Role.STANDBY.value

    def _known_records(self) -> list[NodeRecord]:
        if self.peers is None:
            return []
        if self.peers.is_client:
            return list(self.peers.routes.records)
        return list(self.peers.records())

    async def _mesh_secret(self) -> MeshSecret:
        if self._tokens:
            return MeshSecret(self._tokens[0].mesh_id, self._tokens[0].secret)
        return await asyncio.to_thread(load_or_create_mesh, self._config.mesh_path)

    async def _initial_record(self) -> NodeRecord:
        assert self.identity is not None and self._hardware is not None
        on_disk = await run_in_daemon_thread(lambda: list_local_models(self._config.models_dir))
        return NodeRecord(
            node_id=self.identity.node_id,
            # Seeded from the wall clock so a restarted node's records are newer in practice;
            # the core refutes stale copies of itself when the clock went backwards.
            version=time.time_ns() // 1_000_000,
            name=socket.gethostname(),
            role=self._role(),
            vram_bytes=self._hardware.vram_bytes,
            backend=self._hardware.backend,
            models_on_disk={m.name: m.size_bytes for m in on_disk},
            requested_models=self._requested_models(),
            api_port=self._config.api.port,
            software_version=__version__,
        )

    def _on_local_change(self) -> None:
        """A local model changed state: republish and re-plan."""
        if self._placement is not None:
            self._placement.on_local_change()
        if self.peers is not None and not self.peers.is_client:
            changes: dict[str, Any] = {"requested_models": self._requested_models()}
            binaries = self._binaries.binaries
            if binaries is not None:
                changes |= {"build_id": binaries.build_id, "rpc_protocol": binaries.rpc_protocol}
            self.peers.update_self(**changes)

    def _assigned_server(self, model: str) -> ModelServer:
        """A server for a model the mesh assigned to this node (it had no --model)."""
        server = ModelServer(model, self._config, self._binaries, self._on_local_change)
        self._servers.append(server)
        return server

    def _requested_models(self) -> tuple[str, ...]:
        """The models this node asks the mesh for, by model name once known."""
        names = [s.model.name if s.model is not None else s.spec for s in self._servers]
        return tuple(dict.fromkeys([*names, *(model_name_of(spec) for spec in self._wanted)]))

    async def _start_console(self) -> web.AppRunner:
        console = create_console_app(
            self, proxy=lambda: self._proxy, headless=self._config.headless
        )
        # handler_cancellation: the page's stop button aborts its chat request, which cancels
        # the proxied request (the host's slot frees), as for an API client that goes away.
        runner = web.AppRunner(console, access_log=None, handler_cancellation=True)
        await runner.setup()
        await _start_site(runner, LOOPBACK, self._config.console_port, "--console")
        port = self._config.console_port
        if not self._config.headless:
            self._announce(f"Console: http://{LOOPBACK}:{port}/")
        return runner

    async def _start_api(self) -> web.AppRunner:
        api = self._config.api
        app = create_app(self, api, mesh=self, sources=self._metric_sources())
        # Outermost, so a draining node refuses before any other work (frozen at setup).
        app.middlewares.insert(0, drain_middleware(self._drain, PROXIED_PATHS, api.retry_after_s))
        runner = web.AppRunner(
            app,
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            access_log=None,
            # The drain already gave requests their grace; what is left is cut at once.
            shutdown_timeout=self._config.shutdown_cutoff_s,
            **http_limits(api),
        )
        await runner.setup()
        self._proxy = runner.app[PROXY_KEY]
        inbound = runner.app[INBOUND_KEY]
        inbound.drop = self.drop_local  # a drop forwarded by another node: never forward again
        inbound.drain = self._drain
        self._handlers.serve(StreamType.HTTP, inbound.serve)
        await _start_site(runner, api.host, api.port, "--port")
        warn_if_exposed(api)
        self._announce(f"OpenAI API: {self.api_url}  (answers 503 until a model is ready)")
        return runner


async def _start_site(runner: web.AppRunner, host: str, port: int, flag: str) -> None:
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise ConfigError(
            f"cannot listen on {host}:{port} ({exc.strerror}); is another mesh-llm running? "
            f"Stop it or pass {flag}"
        ) from exc


def _one_error(failed: BaseExceptionGroup[BaseException]) -> MeshError:
    """The error a failed node task ends the node with: its `MeshError` as is; anything else is
    a bug, logged here with its traceback and reported as a `MeshError` that says so."""
    mesh_errors, others = failed.split(MeshError)
    if others is not None:
        log.error("a task of the node failed", exc_info=others)
    leaves = list(_leaves(mesh_errors if mesh_errors is not None else failed))
    if mesh_errors is not None and isinstance(leaves[0], MeshError):
        return leaves[0]
    return MeshError(f"the node stopped after an internal error ({leaves[0]!r}); see the log")


def _leaves(group: BaseExceptionGroup[BaseException]) -> list[BaseException]:
    found: list[BaseException] = []
    for exc in group.exceptions:
        found += _leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
    return found


def _now() -> float:
    return asyncio.get_running_loop().time()


def _local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine, then loopback."""
    found: set[str] = set()
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.add(address.address)
    return [*sorted(found), LOOPBACK]
