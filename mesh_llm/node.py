"""The composition root: builds a node from a `Config` and runs it until shutdown.

Startup order (DESIGN.md §2): sweep children left by a dead node → identity → reserve the mesh
UDP port → mesh secret and invite token → API up (503 until a model is ready) → resolve the
model (download or assemble, in a thread) → ensure llama.cpp binaries (build once, in a thread)
→ launch and supervise llama-server. Shutdown: stop accepting API requests, let in-flight
requests finish within `shutdown_grace_s`, stop children, return. Every task lives in one
TaskGroup owned by `Node.run`; the shutdown trigger is an injected `asyncio.Event`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

import aiohttp
import psutil
from aiohttp import web

from mesh_llm.api.app import create_app
from mesh_llm.backend.build import Binaries, ensure_binaries
from mesh_llm.backend.llama import LOOPBACK, build_llama_server_argv
from mesh_llm.backend.process import (
    ChildSpec,
    ChildState,
    HealthCheck,
    Supervisor,
    kill_process_group_now,
    sweep_stale_children,
)
from mesh_llm.config import Config
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.errors import ConfigError, MeshError
from mesh_llm.identity import NodeIdentity, load_or_create_identity, load_or_create_mesh
from mesh_llm.models.resolve import ResolvedModel, resolve_model
from mesh_llm.token import InviteToken, encode_token

log = logging.getLogger(__name__)

_T = TypeVar("_T")
HEALTH_REQUEST_TIMEOUT_S = 2.0
PROGRESS_LOG_INTERVAL_S = 5.0
Announce = Callable[[str], None]


@dataclass(slots=True)
class _ModelSlot:
    """Mutable per-model state owned by the node; the API reads snapshots of it."""

    spec: str
    status: ModelStatus
    supervisor: Supervisor | None = None
    aliases: tuple[str, ...] = field(default=())


class Node:
    """One mesh-llm process: API, model, backend; `run()` until `shutdown` is set."""

    def __init__(self, config: Config, *, announce: Announce | None = None) -> None:
        self._config = config
        self._announce = announce or (lambda line: log.info("%s", line))
        self._slots = [
            _ModelSlot(spec, ModelStatus(ModelName(spec), ModelState.LOADING, "waiting to start"))
            for spec in config.models
        ]
        self._binaries: Binaries | None = None
        self._binaries_lock = asyncio.Lock()
        self._cancel_build = threading.Event()
        self.identity: NodeIdentity | None = None
        self.token: str | None = None
        self.api_url = f"http://{config.api.host}:{config.api.port}/v1"

    # -- ModelDirectory -------------------------------------------------------------------

    def model_statuses(self) -> Sequence[ModelStatus]:
        return [slot.status for slot in self._slots]

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self, shutdown: asyncio.Event) -> None:
        """Run the node until `shutdown` is set; raises `MeshError` for fatal start-up errors."""
        config = self._config
        await asyncio.to_thread(sweep_stale_children, config.run_dir)
        self.identity = await asyncio.to_thread(
            load_or_create_identity, config.key_path, ephemeral=config.ephemeral_key
        )
        with _reserve_udp_port() as mesh_socket:
            self.token = await self._make_token(mesh_socket.getsockname()[1])
            runner = await self._start_api()
            try:
                async with asyncio.TaskGroup() as group:
                    serving = [group.create_task(self._serve(slot)) for slot in self._slots[:1]]
                    for slot in self._slots[1:]:
                        slot.status = _status(
                            slot, ModelState.LOADING, "wanted by the mesh; no node serves it yet"
                        )
                    await shutdown.wait()
                    log.info("shutting down", extra={"event": "node_stopping"})
                    self._cancel_build.set()
                    await self._drain_api(runner)
                    await self._stop_backends()
                    for task in serving:
                        task.cancel()
            finally:
                await runner.cleanup()
        log.info("node stopped", extra={"event": "node_stopped"})

    def kill_children_now(self) -> None:
        """Forced exit path (second signal): SIGKILL every child at once."""
        for slot in self._slots:
            pid = slot.supervisor.pid if slot.supervisor else None
            if pid is not None:
                kill_process_group_now(pid)

    async def _make_token(self, mesh_port: int) -> str:
        assert self.identity is not None
        mesh = await asyncio.to_thread(load_or_create_mesh, self._config.mesh_path)
        addrs = tuple(f"{ip}:{mesh_port}" for ip in _local_addresses())
        token = encode_token(InviteToken(mesh.mesh_id, mesh.secret, self.identity.node_id, addrs))
        self._announce(f"Node {self.identity.short_id} — invite token:\n{token}")
        return token

    async def _start_api(self) -> web.AppRunner:
        api = self._config.api
        runner = web.AppRunner(
            create_app(self, api),
            handler_cancellation=True,  # a client that goes away cancels its upstream request
            access_log=None,
            shutdown_timeout=self._config.shutdown_grace_s,
        )
        await runner.setup()
        site = web.TCPSite(runner, api.host, api.port)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(
                f"cannot listen on {api.host}:{api.port} ({exc.strerror}); is another mesh-llm "
                f"running? Stop it or pass --port"
            ) from exc
        self._announce(f"OpenAI API: {self.api_url}  (answers 503 until the model is ready)")
        return runner

    async def _drain_api(self, runner: web.AppRunner) -> None:
        # Closing the sites stops new connections; in-flight handlers get shutdown_grace_s.
        for site in list(runner.sites):
            await site.stop()

    async def _stop_backends(self) -> None:
        async with asyncio.TaskGroup() as group:
            for slot in self._slots:
                if slot.supervisor is not None:
                    group.create_task(slot.supervisor.stop())

    # -- serving one model ----------------------------------------------------------------

    async def _serve(self, slot: _ModelSlot) -> None:
        try:
            slot.status = _status(slot, ModelState.LOADING, "resolving model")
            model = await run_in_daemon_thread(
                lambda: resolve_model(
                    slot.spec, self._config.models_dir, progress=_ProgressLog(slot.spec)
                )
            )
            slot.aliases = tuple(a for a in {slot.spec, model.path.name} if a != model.name)
            slot.status = ModelStatus(
                model.name, ModelState.LOADING, "preparing llama.cpp", aliases=slot.aliases
            )
            binaries = await self._ensure_binaries(slot)
            await self._supervise(slot, model, binaries)
        except MeshError as exc:
            log.error("cannot serve %s: %s", slot.spec, exc, extra={"event": "model_failed"})
            slot.status = _status(slot, ModelState.FAILED, str(exc))

    async def _ensure_binaries(self, slot: _ModelSlot) -> Binaries:
        async with self._binaries_lock:
            if self._binaries is None:
                slot.status = _status(
                    slot, ModelState.LOADING, "building llama.cpp (first start only, ~15 min)"
                )
                progress = _ProgressLog("llama.cpp build")
                self._binaries = await run_in_daemon_thread(
                    lambda: ensure_binaries(
                        self._config.backend, self._config.cache_dir, progress, self._cancel_build
                    )
                )
                log.info(
                    "llama.cpp %s (RPC protocol %s) from %s",
                    self._binaries.build_id,
                    self._binaries.rpc_protocol,
                    self._binaries.llama_server.parent,
                    extra={"event": "binaries_ready", "source": self._binaries.source},
                )
            return self._binaries

    async def _supervise(self, slot: _ModelSlot, model: ResolvedModel, binaries: Binaries) -> None:
        backend = self._config.backend
        port = _free_tcp_port()
        argv = build_llama_server_argv(
            binaries.llama_server,
            model.path,
            port,
            ctx_size=backend.ctx_size,
            threads=backend.threads,
            alias=model.name,
            extra_args=backend.extra_args,
        )
        endpoint = f"http://{LOOPBACK}:{port}"

        def on_state(state: ChildState, detail: str) -> None:
            if state is ChildState.READY:
                slot.status = ModelStatus(
                    model.name, ModelState.READY, "", endpoint=endpoint, aliases=slot.aliases
                )
                log.info("serving %s at %s", model.name, self.api_url, extra={"event": "ready"})
            else:
                slot.status = _status(slot, ModelState.LOADING, detail)

        slot.supervisor = Supervisor(
            ChildSpec("llama-server", tuple(argv)),
            health=_health_check(endpoint),
            config=backend,
            run_dir=self._config.run_dir,
            on_state=on_state,
        )
        await slot.supervisor.run()


def run_in_daemon_thread(work: Callable[[], _T]) -> asyncio.Future[_T]:
    """Run blocking `work` in a daemon thread: a download or build in progress must not keep
    the process alive after shutdown (the default executor is joined at exit)."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[_T] = loop.create_future()

    def settle(result: _T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]  # None only when error is set

    def target() -> None:
        try:
            outcome: tuple[_T | None, BaseException | None] = (work(), None)
        except BaseException as exc:  # handed to the awaiting task, not swallowed
            outcome = (None, exc)
        with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, daemon=True, name="mesh-llm-blocking").start()
    return future


def _status(slot: _ModelSlot, state: ModelState, reason: str) -> ModelStatus:
    return ModelStatus(slot.status.name, state, reason, aliases=slot.aliases)


def _health_check(endpoint: str) -> HealthCheck:
    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=HEALTH_REQUEST_TIMEOUT_S)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(endpoint + "/health") as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return check


class _ProgressLog:
    """Turns progress callbacks from worker threads into throttled INFO log lines."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._last = 0.0

    def __call__(self, done: int | str, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last < PROGRESS_LOG_INTERVAL_S:
            return
        self._last = now
        if isinstance(done, str):
            log.info("%s: %s", self._what, done, extra={"event": "progress"})
        elif total:
            log.info("%s: %.0f%% of %d MB", self._what, 100 * done / total, total >> 20)
        else:
            log.info("%s: %d MB", self._what, done >> 20)


@contextlib.contextmanager
def _reserve_udp_port() -> Iterator[socket.socket]:
    """Bind the mesh's UDP port now so the invite token names a port that stays ours."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.bind(("0.0.0.0", 0))
        yield sock
    finally:
        sock.close()


def _free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port


def _local_addresses() -> list[str]:
    """Non-loopback IPv4 addresses of this machine, then loopback."""
    found: list[str] = []
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family == socket.AF_INET and not address.address.startswith("127."):
                found.append(address.address)
    return [*sorted(set(found)), LOOPBACK]
