"""Serving one model locally: resolve it, ensure llama.cpp, run and supervise llama-server.

`ModelServer.run()` walks a model from its spec to a ready llama-server and keeps it running;
its `status` (a `ModelStatus` for the router) changes along the way and every change calls the
`on_change` callback (the node republishes its record). `Binaries` are shared between servers
through `BinaryProvider`, which builds llama.cpp at most once. Blocking work (downloads,
assembly, builds) runs in daemon threads so that a shutdown never waits for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import aiohttp

from mesh_llm.backend.build import Binaries, ensure_binaries
from mesh_llm.backend.llama import LOOPBACK, build_llama_server_argv
from mesh_llm.backend.process import ChildSpec, ChildState, HealthCheck, Supervisor
from mesh_llm.config import BackendConfig, Config
from mesh_llm.core.capabilities import BackendMode, ModelFacts, backend_mode
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.errors import MeshError, ModelError
from mesh_llm.models.catalog import find_entry, load_catalog
from mesh_llm.models.gguf import read_gguf_info
from mesh_llm.models.resolve import ResolvedModel, list_local_models, resolve_model

log = logging.getLogger(__name__)

_T = TypeVar("_T")


class BinaryProvider:
    """llama.cpp binaries for every model server of a node, built at most once."""

    def __init__(self, config: Config) -> None:
        self._config = config
        self._binaries: Binaries | None = None
        self._lock = asyncio.Lock()
        self.cancel = threading.Event()

    @property
    def binaries(self) -> Binaries | None:
        return self._binaries

    async def get(self) -> Binaries:
        async with self._lock:
            if self._binaries is None:
                progress = ProgressLog("llama.cpp build", self._config.backend)
                config = self._config
                self._binaries = await run_in_daemon_thread(
                    lambda: ensure_binaries(config.backend, config.cache_dir, progress, self.cancel)
                )
                log.info(
                    "llama.cpp %s (RPC protocol %s) from %s",
                    self._binaries.build_id,
                    self._binaries.rpc_protocol,
                    self._binaries.llama_server.parent,
                    extra={"event": "binaries_ready", "source": self._binaries.source},
                )
            return self._binaries


class ModelServer:
    """One model served by this node's own llama-server."""

    def __init__(
        self,
        spec: str,
        config: Config,
        binaries: BinaryProvider,
        on_change: Callable[[], None],
    ) -> None:
        self.spec = spec
        self._config = config
        self._binaries = binaries
        self._on_change = on_change
        # Until the file is resolved, answer to the catalog's model name too, so an early
        # request gets "loading" (503), not "unknown model" (404).
        self._early_name = model_name_of(spec)
        self._aliases: tuple[str, ...] = (spec,) if self._early_name != spec else ()
        self.status = ModelStatus(
            ModelName(self._early_name),
            ModelState.LOADING,
            "waiting to start",
            aliases=self._aliases,
        )
        self.supervisor: Supervisor | None = None
        self.model: ResolvedModel | None = None
        self.draft: Path | None = None
        self.mode: BackendMode | None = None  # endpoints it answers, known once resolved

    def _set(self, state: ModelState, reason: str, endpoint: str | None = None) -> None:
        name = self.model.name if self.model is not None else ModelName(self._early_name)
        capabilities = self.mode.capabilities if self.mode is not None else ()
        status = ModelStatus(
            name, state, reason, endpoint=endpoint, aliases=self._aliases, capabilities=capabilities
        )
        if status != self.status:  # re-planning repeats states: only real changes propagate
            self.status = status
            self._on_change()

    async def run(self) -> None:
        """Prepare, then serve solo until cancelled or `stop()`."""
        if await self.prepare() is not None:
            await self.serve()

    async def prepare(self) -> ResolvedModel | None:
        """Resolve the model and ensure llama.cpp; None (status FAILED) when impossible.

        A node without `--join` has nothing else to do then: the `MeshError` is raised so the
        node exits 1 with its message. A node in a mesh logs it and stands by.
        """
        try:
            self._set(ModelState.LOADING, "resolving model")
            spec, models_dir, cache = self.spec, self._config.models_dir, self._config.cache_dir
            progress = ProgressLog(spec, self._config.backend)
            model = await run_in_daemon_thread(
                lambda: resolve_model(
                    spec,
                    models_dir,
                    progress=progress,
                    cache_dir=cache,
                    timeouts=self._config.backend,
                )
            )
            self.model = model
            names = {self.spec, self.model.path.name, self.model.path.stem}
            self._aliases = tuple(sorted(a for a in names if a != self.model.name))
            self.draft = await run_in_daemon_thread(lambda: find_draft(model, self._config))
            self.mode = await run_in_daemon_thread(lambda: serving_mode(model, self._config, spec))
            self._set(ModelState.LOADING, "preparing llama.cpp (first start builds it, ~5 min)")
            await self._binaries.get()
        except MeshError as exc:
            self._set(ModelState.FAILED, str(exc))
            if not self._config.join:
                raise
            log.error(
                "cannot serve %s: %s — standing by in the mesh (--join) without it",
                self.spec,
                exc,
                extra={"event": "model_failed"},
            )
            return None
        return self.model

    def wait(self, reason: str) -> None:
        """Not launchable yet (e.g. waiting for peers): the API answers 503 with `reason`."""
        self._set(ModelState.LOADING, reason)

    async def serve(
        self, rpc_endpoints: tuple[str, ...] = (), tensor_split: tuple[float, ...] = ()
    ) -> None:
        """Run llama-server (optionally split over RPC endpoints) until `stop()`."""
        assert self.model is not None and self._binaries.binaries is not None, "prepare() first"
        try:
            await self._supervise(self.model, self._binaries.binaries, rpc_endpoints, tensor_split)
        except MeshError as exc:
            log.error("cannot serve %s: %s", self.spec, exc, extra={"event": "model_failed"})
            self._set(ModelState.FAILED, str(exc))

    async def stop(self) -> None:
        if self.supervisor is not None:
            await self.supervisor.stop()

    async def _supervise(
        self,
        model: ResolvedModel,
        binaries: Binaries,
        rpc_endpoints: tuple[str, ...],
        tensor_split: tuple[float, ...],
    ) -> None:
        backend = self._config.backend
        mode = self.mode or BackendMode(())
        port = free_tcp_port()
        argv = build_llama_server_argv(
            binaries.llama_server,
            model.path,
            port,
            ctx_size=backend.ctx_size,
            threads=backend.threads,
            alias=model.name,
            rpc_endpoints=rpc_endpoints,
            tensor_split=tensor_split,
            draft_model=self.draft,
            embeddings=mode.embeddings,
            pooling=mode.pooling,
            reranking=mode.reranking,
            extra_args=backend.extra_args,
        )
        endpoint = f"http://{LOOPBACK}:{port}"
        how = (
            f"split over {len(rpc_endpoints)} rpc worker(s) {tensor_split}"
            if rpc_endpoints
            else "solo"
        )

        def on_state(state: ChildState, detail: str) -> None:
            if state is ChildState.READY:
                self._set(ModelState.READY, "", endpoint)
                log.info(
                    "serving %s (%s)",
                    model.name,
                    how,
                    extra={"event": "ready", "model": model.name},
                )
            else:
                self._set(ModelState.LOADING, detail)

        self.supervisor = Supervisor(
            ChildSpec("llama-server", tuple(argv)),
            health=health_check(endpoint, backend.health_request_timeout_s),
            config=backend,
            run_dir=self._config.run_dir,
            on_state=on_state,
        )
        await self.supervisor.run()


def model_name_of(spec: str) -> str:
    """A catalog name's model name (file stem), without touching disk or network."""
    try:
        return find_entry(spec).model_name
    except MeshError:
        return spec


def serving_mode(model: ResolvedModel, config: Config, spec: str = "") -> BackendMode:
    """The endpoints `model` answers and the llama-server flags they need, from its GGUF
    header and `--embeddings` (which names the model by spec, name, alias or file). Blocking
    (reads the header). Raises `ModelError` when the file is not a readable GGUF."""
    info = read_gguf_info(model.path)
    facts = ModelFacts(info.pooling_type, info.fill_in_middle, info.chat_template)
    names = {model.name, model.path.name, model.path.stem, str(model.path), spec} - {""}
    wanted = set(config.backend.embeddings)
    requested = bool(names & wanted) or any(model_name_of(w) in names for w in wanted)
    mode = backend_mode(facts, embeddings_requested=requested)
    log.info(
        "%s answers %s",
        model.name,
        ", ".join(c.value for c in mode.capabilities),
        extra={"event": "capabilities", "model": model.name},
    )
    return mode


def find_draft(model: ResolvedModel, config: Config) -> Path | None:
    """The draft model for speculative decoding: `--draft`, else the catalog's draft when it is
    already on disk; None with `--no-draft`. Raises `ModelError` for a bad `--draft` path."""
    backend = config.backend
    if backend.no_draft:
        return None
    if backend.draft_path is not None:
        if not backend.draft_path.is_file():
            raise ModelError(f"--draft {backend.draft_path} is not a file")
        return backend.draft_path
    entry = next((e for e in load_catalog() if e.model_name == model.name), None)
    if entry is None or entry.draft is None:
        return None
    try:
        draft_name = find_entry(entry.draft).model_name
    except ModelError:
        return None
    for local in list_local_models(config.models_dir):
        if local.name == draft_name:
            log.info("using draft model %s for %s", local.name, model.name)
            return local.path
    log.info(
        "draft model %s for %s is not on disk (`mesh-llm download %s` enables it)",
        draft_name,
        model.name,
        entry.draft,
    )
    return None


def health_check(endpoint: str, timeout_s: float) -> HealthCheck:
    """A check that llama-server's `/health` answers 200 within `timeout_s`."""

    async def check() -> bool:
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(endpoint + "/health") as response,
            ):
                return response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    return check


class ProgressLog:
    """Turns progress callbacks from worker threads into throttled INFO log lines."""

    def __init__(self, what: str, config: BackendConfig) -> None:
        self._what = what
        self._interval_s = config.progress_log_interval_s
        self._last = 0.0

    def __call__(self, done: int | str, total: int | None = None) -> None:
        now = time.monotonic()
        if now - self._last < self._interval_s:
            return
        self._last = now
        if isinstance(done, str):
            log.info("%s: %s", self._what, done, extra={"event": "progress"})
        elif total:
            log.info("%s: %.0f%% of %d MB", self._what, 100 * done / total, total >> 20)
        else:
            log.info("%s: %d MB", self._what, done >> 20)


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


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
        return port
