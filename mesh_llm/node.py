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
import logging
import random
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import psutil
from aiohttp import web

from mesh_llm import __version__
from mesh_llm.api.app import INBOUND_KEY, PROXY_KEY, create_app
from mesh_llm.api.auth import warn_if_exposed
from mesh_llm.api.console import create_console_app
from mesh_llm.api.drain import Drain
from mesh_llm.api.metrics import MetricSources
from mesh_llm.api.operations import http_limits
from mesh_llm.api.proxy import Proxy
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
from mesh_llm.drop import Drops
from mesh_llm.errors import ConfigError, PeerUnavailable, one_error
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
from mesh_llm.net.relay import RelayHop
from mesh_llm.net.transport import PeerTransport, StreamHandlers, start_fast_lane_server
from mesh_llm.net.tunnel import RpcTunnels, rpc_worker_handler
from mesh_llm.node_status import NodeFacts, status_document
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
        self._relay: RelayHop | None = None  # streams through a node both ends reach
        self.api_url = f"http://{config.api.host}:{config.api.port}/v1"
        self._shutdown: asyncio.Event | None = None
        self._proxy: Proxy | None = None  # the API's router, shared by the console's chat
        self._demand = DemandMeter(config.demand_half_life_s)
        self._drain = Drain()  # API requests in flight, local and for other nodes
        self._drops = Drops(
            config,
            served=lambda: [server.status for server in self._servers],
            statuses=self.model_statuses,
            peers=self,
            leave=self._leave,
            short_id=lambda: self.identity.short_id if self.identity else "",
        )

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
        return await self._drops.drop(model)

    async def drop_local(self, model: str) -> tuple[int, dict[str, Any]]:
        """A drop another node forwarded: only this node's own models."""
        return await self._drops.drop_local(model)

    def status(self) -> dict[str, Any]:
        facts = NodeFacts(
            node_id=self._node_id(),
            short_id=self.identity.short_id if self.identity else "",
            role=self._role(),
            api_url=self.api_url,
            mesh_port=self.peers.port if self.peers is not None else None,
            hardware=self._hardware,
            binaries=self._binaries.binaries,
            draining=self._drain.draining,
            token=self.token,
        )
        peers = self.peers.snapshot() if self.peers is not None else {"peers": [], "clients": 0}
        lanes = {
            "fast_lane_port": self._fast_lane.port if self._fast_lane is not None else None,
            "rpc_tunnels": self._tunnels.snapshot() if self._tunnels is not None else [],
            "api_lanes": self._http.snapshot() if self._http is not None else None,
            "relay": self._relay.snapshot() if self._relay is not None else None,
        }
        plan = self._placement.plan if self._placement is not None else None
        statuses = self.model_statuses()
        return status_document(
            self._config, facts, statuses, self._known_records(), peers, lanes, plan
        )

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
            probe_s = config.backend.rocm_smi_timeout_s
            self._hardware = await run_in_daemon_thread(
                lambda: detect_hardware(max_vram_bytes=cap, rocm_smi_timeout_s=probe_s)
            )
            core = MeshCore(await self._initial_record(), config.mesh, random.Random(), _now())
        self.peers = PeerManager(
            self.identity,
            mesh,
            core,
            tokens=self._tokens,
            timings=config.net,
            inbound=self._handlers.accept,
            on_change=self._on_mesh_change,
        )
        port = await self.peers.bind(config.net.bind_host, config.net.bind_port)
        self._transport, self._http = self._peer_transport(self.peers, mesh)
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
            raise one_error(failed) from failed
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
                tasks.append(group.create_task(self._placement.run()))
                tasks.append(group.create_task(self._publish_demand()))
            await shutdown.wait()
            self._binaries.cancel.set()
            # New API requests get 503; those in flight — this node's clients' and other
            # nodes' — finish while the mesh links and model servers they need are still up.
            await self._drain.finish(self._config.shutdown_grace_s)
            await self.peers.leave()
            for runner in runners:
                for site in list(runner.sites):
                    await site.stop()
            if self._placement is not None:
                await self._placement.stop()
            for task in tasks:  # lanes, tunnels, links: each ends what it owns
                task.cancel()

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

    def _peer_transport(
        self, peers: PeerManager, mesh: MeshSecret
    ) -> tuple[PeerTransport, HttpPeerClient]:
        """How this node reaches peers (directly, or through a relay), and its pool for API
        requests to other hosts."""
        assert self.identity is not None
        net = self._config.net
        fast = {StreamType.RPC} | ({StreamType.HTTP} if net.api_fast_lane else set())
        self._relay = RelayHop(
            self.identity,
            mesh,
            peers,
            self._handlers.accept,
            handshake_timeout_s=net.relay_handshake_timeout_s,
        )
        self._handlers.serve(StreamType.RELAY, self._relay.serve_relay)
        self._handlers.serve(StreamType.RELAYED, self._relay.serve_relayed)
        transport = PeerTransport(
            self.identity,
            peers,
            fast_lane_purposes=frozenset(fast),
            connect_timeout_s=net.fast_lane_connect_timeout_s,
            fast_lane_retry_s=net.fast_lane_retry_s,
            relay=self._relay if net.relay else None,
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

    def _leave(self) -> None:
        if self._shutdown is not None:
            self._shutdown.set()

    def _on_mesh_change(self) -> None:
        """The mesh's records (or a client's routing table) changed: re-plan."""
        if self._placement is not None:
            self._placement.notify()

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
            self, proxy=lambda: self._proxy, headless=self._config.headless, config=self._config
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
        # A drop forwarded by another node is answered by drop_local: never forwarded again.
        sources = self._metric_sources()
        app = create_app(
            self, api, mesh=self, sources=sources, drain=self._drain, peer_drop=self.drop_local
        )
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
        self._handlers.serve(StreamType.HTTP, runner.app[INBOUND_KEY].serve)
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
