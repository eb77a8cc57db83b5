"""End-to-end placement under failure, and the RPC tunnel's lanes, with real processes.

Real `mesh-llm` nodes on loopback, real llama-server/rpc-server and the demo model: the host of
a split dies (kill -9) and the other member of the group takes the model over; llama-server
starts exactly once per election result while gossip runs, across a split and the re-plan
after a worker's death; a split's RPC sessions use the fast lane (TCP + TLS) with bytes counted
in `/api/status` and `mesh-llm status`; with the worker's fast lane unreachable (it advertises a
dead port) they fall back to QUIC and the chat still answers.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, Nodes, free_tcp_port, wait_until
from tests.e2e.models import GEMMA

pytestmark = pytest.mark.e2e

MODEL = GEMMA.name  # split tests use the bigger of the two real models
SPLIT_TIMEOUT_S = 120.0
READY_TIMEOUT_S = 240.0
DEAD_AND_REPLAN_S = 60.0  # dead (refused probes, or 5 s of silence), then a solo load
GOSSIP_WINDOW_S = 8.0  # several gossip rounds (2 s) and re-plans with nothing to change
STARTED = "llama-server started"


@pytest.fixture
def mesh(tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path) -> Iterator[Nodes]:
    group = Nodes(tmp_path, llama_binaries.llama_server.parent, demo_models_dir)
    try:
        yield group
    finally:
        group.close()


def _children(node: MeshProcess) -> list[str]:
    return sorted(p.name() for p in node.descendants())


def _chat(node: MeshProcess) -> int:
    with OpenAI(base_url=node.base_url + "/v1", api_key="unused") as client:
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8
        )
        assert reply.usage is not None
        return reply.usage.completion_tokens


def _split_ready(host: MeshProcess) -> None:
    wait_until(lambda: "--rpc" in host.llama_argv(), SPLIT_TIMEOUT_S, "a split llama-server")
    host.wait_ready(timeout_s=READY_TIMEOUT_S)


def _serves_solo(node: MeshProcess) -> bool:
    """A llama-server without --rpc, and the model ready on this node itself (/readyz alone is
    also 200 while a model is still reachable on another node)."""
    argv = node.llama_argv()
    local_ready = any(
        m["host"] == "local" and m["state"] == "ready" for m in node.status().get("models", [])
    )
    return bool(argv) and "--rpc" not in argv and local_ready


def _tunnels(node: MeshProcess) -> list[dict[str, Any]]:
    tunnels: list[dict[str, Any]] = node.status().get("rpc_tunnels", [])
    return tunnels


def test_host_death_another_member_takes_over(mesh: Nodes) -> None:
    seed, token = mesh.seed("--split", model=GEMMA.catalog)
    # A member of the group (it serves the same model) that lends its VRAM as the rpc worker.
    member = mesh.start("member", "--model", GEMMA.catalog, "--join", token, "--max-vram", "1")
    _split_ready(seed)
    assert _children(member) == ["ggml-rpc-server"]
    seed.signal(signal.SIGKILL)
    seed.wait_exit()
    wait_until(
        lambda: _serves_solo(member),
        DEAD_AND_REPLAN_S + READY_TIMEOUT_S,
        "the surviving member to serve the model itself",
    )
    assert _children(member) == ["llama-server"]  # its rpc-server is gone, it hosts solo now
    assert _chat(member) > 0
    models = {m["name"]: m["state"] for m in member.status()["models"]}
    assert models[MODEL] == "ready"


def test_llama_server_starts_once_per_election_result_across_a_split(mesh: Nodes) -> None:
    seed, token = mesh.seed("--split", model=GEMMA.catalog)
    worker = mesh.start("worker", "--join", token)  # standby: becomes the rpc worker
    _split_ready(seed)
    split_pid = seed.llama_server().pid
    starts = seed.log_text().count(STARTED)  # solo while alone, then the split: 2
    time.sleep(GOSSIP_WINDOW_S)  # gossip and re-plans run; none may restart the split
    log = seed.log_text()
    assert log.count(STARTED) == starts, log
    assert log.count("split over 1 worker(s)") == 1, log  # one election result, one launch
    assert seed.llama_server().pid == split_pid
    assert _chat(seed) > 0
    worker.signal(signal.SIGKILL)
    worker.wait_exit()
    wait_until(
        lambda: _serves_solo(seed),
        DEAD_AND_REPLAN_S,
        "the host to re-plan solo and serve again",
    )
    time.sleep(GOSSIP_WINDOW_S)
    assert seed.log_text().count(STARTED) == starts + 1, seed.log_text()
    assert _chat(seed) > 0


def test_split_uses_the_fast_lane(mesh: Nodes) -> None:
    seed, token = mesh.seed("--split", model=GEMMA.catalog)
    worker = mesh.start("worker", "--join", token)
    _split_ready(seed)
    assert _chat(seed) > 0
    worker_id = worker.node_id()
    advertised = {p["node_id"]: p["record"]["fast_lane_port"] for p in seed.status()["peers"]}
    assert advertised[worker_id] == worker.status()["fast_lane_port"] > 0
    [tunnel] = _tunnels(seed)
    assert tunnel["worker"] == worker_id
    assert tunnel["lane"] == "fast" and tunnel["reason"] == ""
    assert tunnel["connections"] >= 1
    assert tunnel["bytes_up"] > 0 and tunnel["bytes_down"] > 0
    shown = subprocess.run(
        [sys.executable, "-m", "mesh_llm", "status", "--console", str(seed.console_port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "rpc tunnels" in shown and " fast " in shown, shown


def test_unreachable_fast_lane_falls_back_to_quic(mesh: Nodes) -> None:
    seed, token = mesh.seed("--split", model=GEMMA.catalog)
    dead_port = free_tcp_port()  # nothing listens there
    worker = mesh.start(
        "worker", "--join", token, env={"MESH_LLM_FAST_LANE_ADVERTISE_PORT": str(dead_port)}
    )
    _split_ready(seed)
    assert _chat(seed) > 0
    [tunnel] = _tunnels(seed)
    assert tunnel["worker"] == worker.node_id()
    assert tunnel["lane"] == "quic"
    assert f":{dead_port} failed" in tunnel["reason"]
    assert tunnel["bytes_up"] > 0 and tunnel["bytes_down"] > 0
