"""In-process tier: several real `Node`s in one event loop on 127.0.0.1, fake llama-server.

Each `Node` is the real composition root (QUIC, fast lane, API, console, placement) with its own
home directory; its llama-server is `tests/fakes/fake_llama_server.py` (a child process, healthy
at once, streaming `FAKE_LLAMA_CHUNKS` chunks `FAKE_LLAMA_DELAY_S` apart). Orchestration that
needs no real model runs here instead of end to end: a passive client routes to a host over the
fast lane, and the host's shutdown lets that stream finish before it leaves (503 meanwhile).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from mesh_llm.config import Config, load_config
from mesh_llm.node import Node
from tests.e2e.harness import free_tcp_port
from tests.fakes.fake_llama_server import write_wrapper
from tests.fakes.waiting import wait_until

MODEL = "gemma-3-270m"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}
START_TIMEOUT_S = 60.0
GRACE_S = 30.0


@dataclass
class Running:
    node: Node
    config: Config
    shutdown: asyncio.Event
    task: asyncio.Task[None]

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.config.api.port}"


class Mesh:
    """Nodes of one test, each `Node.run` a task; `close()` stops them by their shutdown."""

    def __init__(self, root: Path, models_dir: Path) -> None:
        self.root = root
        self.models_dir = models_dir
        self.fake = write_wrapper(root / "fake-bin")
        self.running: list[Running] = []

    def start(self, name: str, *flags: tuple[str, object]) -> Running:
        values: dict[str, object] = {
            "home_dir": self.root / name,
            "models_dir": self.models_dir,
            "backend.llama_server_path": self.fake,
            "api.port": free_tcp_port(),
            "console_port": free_tcp_port(),
            "net.bind_host": "127.0.0.1",
            "shutdown_grace_s": GRACE_S,
            **dict(flags),
        }
        config = load_config(values, {})
        node = Node(config, announce=lambda _line: None)
        shutdown = asyncio.Event()
        running = Running(node, config, shutdown, asyncio.create_task(node.run(shutdown)))
        self.running.append(running)
        return running

    async def close(self) -> None:
        for running in self.running:
            running.shutdown.set()
        for running in self.running:
            async with asyncio.timeout(GRACE_S + 30):
                await running.task


@pytest.fixture
async def mesh(tmp_path: Path, demo_models_dir: Path) -> AsyncIterator[Mesh]:
    made = Mesh(tmp_path, demo_models_dir)
    try:
        yield made
    finally:
        await made.close()


def _local_ready(running: Running) -> bool:
    models = running.node.status()["models"]
    return any(m["host"] == "local" and m["state"] == "ready" for m in models)


def _routable_remote(running: Running) -> bool:
    return any(m["remote_hosts"] for m in running.node.status()["models"])


async def _client_of(mesh: Mesh, host: Running) -> Running:
    await wait_until(lambda: host.node.token is not None, "the host's token", START_TIMEOUT_S)
    client = mesh.start("client", ("client", True), ("join", (host.node.token,)))
    await wait_until(lambda: _local_ready(host), "the host's model", START_TIMEOUT_S)
    await wait_until(lambda: _routable_remote(client), "the client's route", START_TIMEOUT_S)
    return client


async def test_a_client_reaches_the_host_over_the_fast_lane(mesh: Mesh) -> None:
    host = mesh.start("host", ("models", (MODEL,)))
    client = await _client_of(mesh, host)
    async with AsyncExitStack() as stack:
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for _ in range(2):
            async with session.post(client.base + "/v1/chat/completions", json=CHAT) as resp:
                assert resp.status == 200, await resp.text()
                body = await resp.text()
            assert body.rstrip().endswith("data: [DONE]")
    lanes = client.node.status()["api_lanes"]
    assert lanes["fast"] == 2 and lanes["quic"] == 0, lanes
    assert host.node.status()["peers"] == [] or all(
        p["node_id"] != client.node.status()["node"]["node_id"] for p in host.node.status()["peers"]
    )  # a passive client is no member of the mesh


async def test_the_host_drains_a_stream_it_serves_for_a_client(
    mesh: Mesh, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_LLAMA_CHUNKS", "60")
    monkeypatch.setenv("FAKE_LLAMA_DELAY_S", "0.05")  # a 3 s stream
    host = mesh.start("host", ("models", (MODEL,)))
    client = await _client_of(mesh, host)
    async with aiohttp.ClientSession() as session:
        resp = await session.post(client.base + "/v1/chat/completions", json=CHAT)
        assert resp.status == 200
        first = await resp.content.readline()
        assert first.startswith(b"data: ")
        host.shutdown.set()  # Ctrl-C on the host, the stream under way
        await wait_until(lambda: host.node.status()["node"]["draining"], "the host drains")
        async with session.post(host.base + "/v1/chat/completions", json=CHAT) as refused:
            assert refused.status == 503
            assert (await refused.json())["error"]["code"] == "shutting_down"
        assert not host.task.done()  # still serving the stream
        rest = (await resp.content.read()).decode()
        resp.close()
    events = [line for line in rest.splitlines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]", events[-3:]
    assert len(events) == 60  # 59 more chunks and [DONE]: nothing was cut
    assert all("error" not in json.loads(e[6:]) for e in events[:-1])
    async with asyncio.timeout(GRACE_S):
        await host.task  # then it leaves, well within the grace
