"""Supervision of child processes (llama-server, rpc-server).

A `Supervisor` owns one child: it spawns it in its own process group with
`PR_SET_PDEATHSIG(SIGKILL)` on Linux (so the child dies even when the node is SIGKILLed), drains
its output line by line into the node log, waits for a health check with a deadline, reports
state changes through a callback, restarts it with exponential backoff after a crash, and stops
it with terminate → grace → kill. A pid file per child lets the next start sweep children left
by a node that could not clean up. Raises `BackendError` when a program cannot be started.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ctypes
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

import psutil

from mesh_llm.config import BackendConfig
from mesh_llm.errors import BackendError

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
OUTPUT_LINE_LIMIT_BYTES = 1024 * 1024
TAIL_LINES = 40


class ChildState(StrEnum):
    STARTING = "starting"
    READY = "ready"
    EXITED = "exited"
    STOPPED = "stopped"


HealthCheck = Callable[[], Awaitable[bool]]
StateListener = Callable[[ChildState, str], None]


@dataclass(frozen=True, slots=True)
class ChildSpec:
    """What to run: a name for logs and pid files, and the argv."""

    name: str
    argv: tuple[str, ...]


class Supervisor:
    """Runs one child until `stop()`; restarts it with backoff when it crashes."""

    def __init__(
        self,
        spec: ChildSpec,
        *,
        health: HealthCheck,
        config: BackendConfig,
        run_dir: Path,
        on_state: StateListener,
    ) -> None:
        self._spec = spec
        self._health = health
        self._config = config
        self._run_dir = run_dir
        self._on_state = on_state
        self._proc: asyncio.subprocess.Process | None = None
        self._stopping = asyncio.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.starts = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    async def run(self) -> None:
        """Keep the child running until `stop()` is called or this task is cancelled."""
        loop = asyncio.get_running_loop()
        backoff = self._config.restart_backoff_initial_s
        while not self._stopping.is_set():
            started = loop.time()
            code = await self._run_once()
            if self._stopping.is_set():
                break
            if loop.time() - started >= self._config.restart_backoff_reset_after_s:
                backoff = self._config.restart_backoff_initial_s
            tail = " | ".join(list(self._tail)[-5:])
            log.warning(
                "%s exited with code %s; restarting in %.1f s; last output: %s",
                self._spec.name,
                code,
                backoff,
                tail,
                extra={"event": "backend_exited", "code": code},
            )
            self._on_state(ChildState.EXITED, f"{self._spec.name} exited with code {code}")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff):  # not wait_for: it can eat a cancel
                    await self._stopping.wait()
            backoff = min(backoff * 2, self._config.restart_backoff_max_s)
        self._on_state(ChildState.STOPPED, f"{self._spec.name} stopped")

    async def stop(self) -> None:
        """Stop the child (terminate, then kill after the grace period); `run()` then returns."""
        self._stopping.set()
        if self._proc is not None:
            await terminate_process(self._proc, self._config.stop_grace_s)

    async def _run_once(self) -> int:
        proc = await spawn_child(self._spec.argv, self._spec.name, self._run_dir)
        self._proc = proc
        self.starts += 1
        self._on_state(ChildState.STARTING, f"{self._spec.name} starting (pid {proc.pid})")
        log.info(
            "%s started (pid %d)",
            self._spec.name,
            proc.pid,
            extra={"event": "backend_started", "pid": proc.pid},
        )
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._drain(proc))
                ready = group.create_task(self._wait_ready(proc))
                code = await proc.wait()
                ready.cancel()
        finally:
            await terminate_process(proc, self._config.stop_grace_s)
            _remove_pid_file(self._run_dir, self._spec.name, proc.pid)
        return code

    async def _drain(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while True:
            try:
                raw = await proc.stdout.readline()
            except ValueError:  # a line over the limit: skip what is buffered, keep draining
                continue
            if not raw:
                return
            line = raw.decode("utf-8", "replace").rstrip()
            self._tail.append(line)
            log.debug("[%s] %s", self._spec.name, line)

    async def _wait_ready(self, proc: asyncio.subprocess.Process) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._config.health_timeout_s
        while proc.returncode is None:
            if await self._health():
                log.info(
                    "%s ready (pid %d)",
                    self._spec.name,
                    proc.pid,
                    extra={"event": "backend_ready", "pid": proc.pid},
                )
                self._on_state(ChildState.READY, f"{self._spec.name} ready")
                return
            if loop.time() > deadline:
                log.error(
                    "%s not healthy after %.0f s (backend.health_timeout_s); killing it",
                    self._spec.name,
                    self._config.health_timeout_s,
                )
                await terminate_process(proc, self._config.stop_grace_s)
                return
            await asyncio.sleep(self._config.health_poll_interval_s)


async def spawn_child(argv: Sequence[str], name: str, run_dir: Path) -> asyncio.subprocess.Process:
    """Start `argv` in its own process group, bound to die with this process; write a pid file."""
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_bind_to_parent(os.getpid()),
            limit=OUTPUT_LINE_LIMIT_BYTES,
        )
    except OSError as exc:
        raise BackendError(f"cannot start {name} ({argv[0]}): {exc.strerror or exc}") from exc
    _write_pid_file(run_dir, name, proc.pid)
    return proc


async def terminate_process(proc: asyncio.subprocess.Process, grace_s: float) -> None:
    """SIGTERM the child's process group, SIGKILL it after `grace_s` seconds; wait for it."""
    if proc.returncode is not None:
        return
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(grace_s):  # not wait_for: it can eat a cancel on 3.11
            await proc.wait()
    except TimeoutError:
        log.warning("pid %d did not stop within %.1f s; killing it", proc.pid, grace_s)
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()


def kill_process_group_now(pid: int) -> None:
    """SIGKILL a child's process group at once (forced exit path; no waiting)."""
    _signal_group(pid, signal.SIGKILL)


def sweep_stale_children(run_dir: Path) -> list[int]:
    """Kill children recorded by pid files whose node is gone; returns the pids killed."""
    killed: list[int] = []
    if not run_dir.is_dir():
        return killed
    for path in run_dir.glob("*.pid"):
        record = _read_pid_file(path)
        if record is not None and _still_orphaned(record):
            _signal_group(record.pid, signal.SIGKILL)
            killed.append(record.pid)
            log.warning("killed stale child pid %d left by a previous node", record.pid)
        if record is None or not psutil.pid_exists(record.node_pid):
            path.unlink(missing_ok=True)
    return killed


def _still_orphaned(record: _PidRecord) -> bool:
    if psutil.pid_exists(record.node_pid):
        return False  # its node is alive: not ours to kill
    try:
        proc = psutil.Process(record.pid)
        return bool(abs(proc.create_time() - record.create_time) < 1.0)
    except psutil.Error:
        return False


def _bind_to_parent(parent_pid: int) -> Callable[[], None]:
    def bind() -> None:  # runs in the child between fork and exec
        if sys.platform.startswith("linux"):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os._exit(1)

    return bind


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def _pid_path(run_dir: Path, name: str, pid: int) -> Path:
    return run_dir / f"{name}-{pid}.pid"


def _write_pid_file(run_dir: Path, name: str, pid: int) -> None:
    try:
        create_time = psutil.Process(pid).create_time()
    except psutil.Error:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    record = {"pid": pid, "node_pid": os.getpid(), "create_time": create_time}
    _pid_path(run_dir, name, pid).write_text(json.dumps(record), "utf-8")


def _remove_pid_file(run_dir: Path, name: str, pid: int) -> None:
    _pid_path(run_dir, name, pid).unlink(missing_ok=True)


@dataclass(frozen=True, slots=True)
class _PidRecord:
    pid: int
    node_pid: int
    create_time: float


def _read_pid_file(path: Path) -> _PidRecord | None:
    try:
        data = json.loads(path.read_text("utf-8"))
        return _PidRecord(int(data["pid"]), int(data["node_pid"]), float(data["create_time"]))
    except (OSError, ValueError, KeyError, TypeError):
        return None
