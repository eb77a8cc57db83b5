"""No llama.cpp child outlives its node, even after `kill -9`, checked by the children's pids.

A split host (llama-server and its own rpc-server) and its worker (rpc-server) are killed with
SIGKILL while the split serves; every child each node had just before (psutil's view, taken
before the kill) must be gone within `CHILD_DEATH_S` — before the harness's own cleanup, which
would kill leftovers silently. The solo case is `test_solo.py`'s kill -9 test. The same
topology checks that llama-server and rpc-server listen on 127.0.0.1 only.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import psutil
import pytest

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, Nodes, wait_until
from tests.e2e.test_reference_plan import FIRST, READY_TIMEOUT_S, SPLIT_TIMEOUT_S

pytestmark = pytest.mark.e2e

CHILD_DEATH_S = 5.0
LLAMA_CPP = ("llama-server", "rpc-server", "ggml-rpc-server")


@pytest.fixture
def nodes(tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path) -> Iterator[Nodes]:
    group = Nodes(tmp_path, llama_binaries.llama_server.parent, demo_models_dir, seed_model=FIRST)
    try:
        yield group
    finally:
        group.close()


def _llama_children(node: MeshProcess) -> list[psutil.Process]:
    return [p for p in node.descendants() if p.name() in LLAMA_CPP]


def _gone(proc: psutil.Process) -> bool:
    try:  # is_running() also compares the creation time: a reused pid is not ours
        return not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _listen_addresses(proc: psutil.Process) -> set[str]:
    return {c.laddr.ip for c in proc.net_connections("inet") if c.status == psutil.CONN_LISTEN} | {
        c.laddr.ip for c in proc.net_connections("udp")
    }


def test_kill_9_of_a_split_host_and_its_worker_leaves_no_child(nodes: Nodes) -> None:
    seed, token = nodes.seed("--split")
    worker = nodes.start("worker", "--join", token)  # standby: the split's rpc worker
    wait_until(lambda: "--rpc" in seed.llama_argv(), SPLIT_TIMEOUT_S, "a split llama-server")
    seed.wait_ready(timeout_s=READY_TIMEOUT_S)
    host_children, worker_children = _llama_children(seed), _llama_children(worker)
    assert sorted(p.name() for p in host_children) == ["ggml-rpc-server", "llama-server"]
    assert [p.name() for p in worker_children] == ["ggml-rpc-server"]
    for child in (*host_children, *worker_children):
        addresses = _listen_addresses(child)
        assert addresses and addresses <= {"127.0.0.1"}, (child.cmdline(), addresses)
    assert FIRST in seed.args
    labels = {child.pid: f"{child.name()} pid {child.pid}" for child in host_children}
    labels |= {child.pid: f"{child.name()} pid {child.pid}" for child in worker_children}
    for node in (worker, seed):  # names read above: a dead child has none to read
        node.signal(signal.SIGKILL)
        node.wait_exit()
    for child in (*host_children, *worker_children):
        wait_until(
            partial(_gone, child), CHILD_DEATH_S, f"{labels[child.pid]} to die with its node"
        )
