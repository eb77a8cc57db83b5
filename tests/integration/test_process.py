"""Supervision of real tiny child processes: readiness, output, restarts, stop, pid files.

Children are `python -c ...` one-liners; no llama.cpp here.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psutil
import pytest

from mesh_llm.backend.process import (
    ChildSpec,
    ChildState,
    Supervisor,
    spawn_child,
    sweep_stale_children,
    terminate_process,
)
from mesh_llm.config import BackendConfig
from tests.fakes import waiting

DEADLINE_S = 5.0
wait_until = functools.partial(waiting.wait_until, timeout_s=DEADLINE_S)
FAST = BackendConfig(
    health_timeout_s=30.0,
    health_poll_interval_s=0.01,
    stop_grace_s=2.0,
    restart_backoff_initial_s=0.05,
    restart_backoff_max_s=0.2,
)
SLEEP_FOREVER = "import time\nwhile True: time.sleep(1)"


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", textwrap.dedent(code))


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


class Recorder:
    """The state listener: every (state, message) with the loop time it arrived."""

    def __init__(self) -> None:
        self.events: list[tuple[ChildState, str, float]] = []

    def __call__(self, state: ChildState, message: str) -> None:
        self.events.append((state, message, asyncio.get_running_loop().time()))

    def states(self) -> list[ChildState]:
        return [state for state, _, _ in self.events]

    def times(self, state: ChildState) -> list[float]:
        return [at for s, _, at in self.events if s is state]


class Health:
    """A health check the test flips; counts its calls."""

    def __init__(self, healthy: bool = False) -> None:
        self.healthy = healthy
        self.calls = 0

    async def __call__(self) -> bool:
        self.calls += 1
        return self.healthy


class Running:
    def __init__(self, supervisor: Supervisor, task: asyncio.Task[None], recorder: Recorder):
        self.supervisor = supervisor
        self.task = task
        self.recorder = recorder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


@pytest.fixture
async def start(run_dir: Path) -> AsyncIterator[Callable[..., Running]]:
    started: list[Running] = []

    def _start(
        argv: tuple[str, ...],
        health: Callable[[], object] | None = None,
        config: BackendConfig = FAST,
        name: str = "child",
    ) -> Running:
        recorder = Recorder()
        supervisor = Supervisor(
            ChildSpec(name, argv),
            health=health or Health(True),  # type: ignore[arg-type]
            config=config,
            run_dir=run_dir,
            on_state=recorder,
        )
        running = Running(supervisor, asyncio.create_task(supervisor.run()), recorder)
        started.append(running)
        return running

    try:
        yield _start
    finally:
        for running in started:
            await running.supervisor.stop()
            async with asyncio.timeout(DEADLINE_S):
                await running.task


async def test_ready_when_health_turns_true(start: Callable[..., Running]) -> None:
    health = Health(False)
    running = start(_python(SLEEP_FOREVER), health)
    await wait_until(lambda: health.calls >= 5, "health polls")
    assert running.recorder.states() == [ChildState.STARTING]
    assert running.supervisor.pid is not None
    health.healthy = True
    await wait_until(lambda: ChildState.READY in running.recorder.states(), "READY")
    assert running.recorder.states() == [ChildState.STARTING, ChildState.READY]
    assert running.supervisor.starts == 1


async def test_output_lines_are_drained_to_the_log(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="mesh_llm.backend.process")
    code = """
        import sys, time
        for i in range(3):
            print(f"hello {i}", flush=True)
        print("to stderr", file=sys.stderr, flush=True)
        while True: time.sleep(1)
    """
    start(_python(code), name="echo")
    expected = {"[echo] hello 0", "[echo] hello 1", "[echo] hello 2", "[echo] to stderr"}
    await wait_until(lambda: expected <= set(caplog.messages), "drained lines in the log")


async def test_crashing_child_is_restarted_with_backoff(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    running = start(_python("print('boom', flush=True); raise SystemExit(3)"))
    await wait_until(lambda: running.supervisor.starts >= 4, "four starts")
    starts = running.recorder.times(ChildState.STARTING)
    exits = running.recorder.times(ChildState.EXITED)
    initial = FAST.restart_backoff_initial_s
    # Each restart waits at least the backoff, which doubles up to the maximum.
    assert starts[1] - exits[0] >= initial * 0.9
    assert starts[2] - exits[1] >= 2 * initial * 0.9
    assert starts[3] - exits[2] >= min(4 * initial, FAST.restart_backoff_max_s) * 0.9
    messages = [m for s, m, _ in running.recorder.events if s is ChildState.EXITED]
    assert messages[0] == "child exited with code 3"
    assert any("boom" in record.getMessage() for record in caplog.records)


async def test_unhealthy_child_is_killed_and_restarted(start: Callable[..., Running]) -> None:
    config = BackendConfig(
        health_timeout_s=0.1,
        health_poll_interval_s=0.01,
        stop_grace_s=1.0,
        restart_backoff_initial_s=0.01,
        restart_backoff_max_s=0.01,
    )
    running = start(_python(SLEEP_FOREVER), Health(False), config)
    await wait_until(lambda: running.supervisor.starts >= 2, "a restart after health timeout")
    assert ChildState.READY not in running.recorder.states()
    assert ChildState.EXITED in running.recorder.states()


async def test_stop_terminates_the_child(start: Callable[..., Running]) -> None:
    running = start(_python(SLEEP_FOREVER))
    await wait_until(lambda: ChildState.READY in running.recorder.states(), "READY")
    pid = running.supervisor.pid
    assert pid is not None
    await running.supervisor.stop()
    async with asyncio.timeout(DEADLINE_S):
        await running.task
    assert _gone(pid)
    assert running.supervisor.pid is None
    assert running.recorder.states()[-1] is ChildState.STOPPED
    assert running.supervisor.starts == 1


async def test_stop_kills_a_child_that_ignores_sigterm(
    start: Callable[..., Running], tmp_path: Path
) -> None:
    armed = tmp_path / "armed"
    code = f"""
        import pathlib, signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pathlib.Path({str(armed)!r}).touch()
        while True: time.sleep(1)
    """

    async def health() -> bool:
        return armed.exists()

    config = BackendConfig(health_poll_interval_s=0.01, stop_grace_s=0.3)
    running = start(_python(code), health, config)
    await wait_until(lambda: ChildState.READY in running.recorder.states(), "READY")
    pid = running.supervisor.pid
    assert pid is not None
    loop = asyncio.get_running_loop()
    began = loop.time()
    await running.supervisor.stop()
    async with asyncio.timeout(DEADLINE_S):
        await running.task
    assert loop.time() - began >= config.stop_grace_s * 0.9  # it waited out the grace period
    assert _gone(pid)


async def test_pid_file_written_and_removed(start: Callable[..., Running], run_dir: Path) -> None:
    running = start(_python(SLEEP_FOREVER), name="llama-server")
    await wait_until(lambda: ChildState.READY in running.recorder.states(), "READY")
    pid = running.supervisor.pid
    assert pid is not None
    pid_file = run_dir / f"llama-server-{pid}.pid"
    assert pid_file.is_file()
    record = json.loads(pid_file.read_text("utf-8"))
    assert record["pid"] == pid
    assert record["node_pid"] == os.getpid()
    assert abs(record["create_time"] - psutil.Process(pid).create_time()) < 0.01
    await running.supervisor.stop()
    async with asyncio.timeout(DEADLINE_S):
        await running.task
    assert not pid_file.exists()
    assert await asyncio.to_thread(lambda: list(run_dir.glob("*.pid"))) == []


async def test_terminate_process_on_an_exited_child_returns_at_once(run_dir: Path) -> None:
    proc = await spawn_child(_python("pass"), "quick", run_dir)
    async with asyncio.timeout(DEADLINE_S):
        assert await proc.wait() == 0
        await terminate_process(proc, 10.0)
    assert proc.returncode == 0


# -- stale children --------------------------------------------------------------------------


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(run_dir: Path, name: str, pid: int, node_pid: int) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{name}-{pid}.pid"
    record = {"pid": pid, "node_pid": node_pid, "create_time": psutil.Process(pid).create_time()}
    path.write_text(json.dumps(record), "utf-8")
    return path


def test_sweep_kills_orphans_and_spares_children_of_live_nodes(run_dir: Path) -> None:
    argv = [sys.executable, "-c", SLEEP_FOREVER]
    orphan = subprocess.Popen(argv, start_new_session=True)
    adopted = subprocess.Popen(argv, start_new_session=True)
    try:
        orphan_file = _record(run_dir, "orphan", orphan.pid, _dead_pid())
        adopted_file = _record(run_dir, "adopted", adopted.pid, os.getpid())
        garbage = run_dir / "garbage-1.pid"
        garbage.write_text("{not json", "utf-8")

        assert sweep_stale_children(run_dir) == [orphan.pid]

        assert orphan.wait(timeout=DEADLINE_S) == -signal.SIGKILL
        assert adopted.poll() is None
        assert not orphan_file.exists()
        assert adopted_file.exists()
        assert not garbage.exists()
    finally:
        for proc in (orphan, adopted):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_sweep_spares_a_reused_pid(run_dir: Path) -> None:
    """A recorded pid now held by another process (other create time) is not killed."""
    other = subprocess.Popen([sys.executable, "-c", SLEEP_FOREVER], start_new_session=True)
    try:
        path = _record(run_dir, "reused", other.pid, _dead_pid())
        record = json.loads(path.read_text("utf-8"))
        record["create_time"] -= 1000
        path.write_text(json.dumps(record), "utf-8")
        assert sweep_stale_children(run_dir) == []
        assert other.poll() is None
        assert not path.exists()
    finally:
        other.kill()
        other.wait()


def test_sweep_without_run_dir(tmp_path: Path) -> None:
    assert sweep_stale_children(tmp_path / "absent") == []


# -- parent death ----------------------------------------------------------------------------

PARENT = """
import asyncio, sys
from pathlib import Path
from mesh_llm.backend.process import spawn_child

async def main() -> None:
    argv = [sys.executable, "-c", "import time\\nwhile True: time.sleep(1)"]
    proc = await spawn_child(argv, "sleeper", Path(sys.argv[1]))
    print(proc.pid, flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


def _read_line(proc: subprocess.Popen[bytes], timeout_s: float) -> str:
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], timeout_s)
    assert ready, f"no output from the parent within {timeout_s} s"
    return proc.stdout.readline().decode().strip()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_child_dies_when_its_parent_is_sigkilled(run_dir: Path) -> None:
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(run_dir)], stdout=subprocess.PIPE)
    child_pid: int | None = None
    try:
        child_pid = int(_read_line(parent, DEADLINE_S))
        child = psutil.Process(child_pid)
        assert child.is_running() and not _gone(child_pid)
        assert child.ppid() == parent.pid

        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=DEADLINE_S)

        deadline = time.monotonic() + DEADLINE_S
        while not _gone(child_pid):
            assert time.monotonic() < deadline, f"child {child_pid} outlived its parent"
            time.sleep(0.02)
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()
        if parent.stdout is not None:
            parent.stdout.close()
        if child_pid is not None and not _gone(child_pid):
            os.kill(child_pid, signal.SIGKILL)
