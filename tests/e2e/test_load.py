"""Load: 200 concurrent streaming requests through a two-node mesh, for 60 s, with 0 errors.

Host A serves the model with the fake llama-server (`tests/fakes/fake_llama_server.py`, which
streams as fast as asked), so the figures are the mesh's own: passive client C in front, every
request crossing C → A over the fast lane. Each of `CONCURRENT` looping clients streams
`EVENTS` events `DELAY_S` apart. Asserted: no error and no short stream; the RSS of each node
grows by at most `RSS_GROWTH_BOUND_MB` (after a warm-up round, so pools and caches are
counted in the baseline). Printed: requests/s, p50/p99 time to first byte, RSS before/after.
`MESH_LLM_SOAK_S` sets the duration (`just soak` runs 30 minutes).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.e2e.harness import MeshProcess, wait_until
from tests.fakes.fake_llama_server import write_wrapper

pytestmark = pytest.mark.e2e

CONCURRENT = 200
DURATION_S = float(os.environ.get("MESH_LLM_SOAK_S", "60"))
EVENTS = 50
DELAY_S = 0.005
RSS_GROWTH_BOUND_MB = 64.0  # measured here: +12 MB (client node), +3 MB (host) in 60 s
MODEL = "gemma-3-270m"
BODY = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True}


def rss_mb(node: MeshProcess) -> float:
    assert node.proc is not None
    return psutil.Process(node.proc.pid).memory_info().rss / 2**20


@pytest.fixture
def front_and_host(tmp_path: Path, demo_models_dir: Path) -> Iterator[tuple[MeshProcess, ...]]:
    fake = write_wrapper(tmp_path / "fake-bin")
    env = {"FAKE_LLAMA_CHUNKS": str(EVENTS), "FAKE_LLAMA_DELAY_S": str(DELAY_S)}
    args = ["--model", MODEL, "--models-dir", str(demo_models_dir)]
    args += ["--llama-server-path", str(fake), "--queue-depth", str(4 * CONCURRENT)]
    host = MeshProcess(tmp_path / "host", args, env=env).start()
    nodes = [host]
    try:
        host.wait_ready()
        wait_until(lambda: bool(host.status().get("token")), 30, "token")
        front = MeshProcess(tmp_path / "front", ["--client", "--join", host.status()["token"]])
        nodes.append(front.start())
        front.wait_ready()
        yield front, host
    finally:
        for node in reversed(nodes):
            node.stop()


async def _one(session: aiohttp.ClientSession, url: str, ttfb: list[float]) -> int:
    started = time.perf_counter()
    events = 0
    async with session.post(url, json=BODY) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.text())[:200]}")
        async for line in response.content:
            if line.startswith(b"data: "):
                if events == 0:
                    ttfb.append(time.perf_counter() - started)
                events += 1
    return events


async def _load(url: str, duration_s: float) -> tuple[int, list[str], list[float]]:
    """(requests completed, errors, times to first byte) of CONCURRENT looping clients."""
    done = 0
    errors: list[str] = []
    ttfb: list[float] = []
    deadline = time.monotonic() + duration_s
    timeout = aiohttp.ClientTimeout(total=None, sock_read=30)
    connector = aiohttp.TCPConnector(limit=CONCURRENT)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def client() -> None:
            nonlocal done
            while time.monotonic() < deadline:
                try:
                    got = await _one(session, url, ttfb)
                except (aiohttp.ClientError, RuntimeError, TimeoutError) as exc:
                    errors.append(repr(exc))
                    continue
                if got != EVENTS + 1:  # + [DONE]
                    errors.append(f"short stream: {got} events")
                done += 1

        await asyncio.gather(*(client() for _ in range(CONCURRENT)))
    return done, errors, ttfb


def test_200_concurrent_streams_for_a_minute(front_and_host: tuple[MeshProcess, ...]) -> None:
    front, host = front_and_host
    url = front.base_url + "/v1/chat/completions"
    asyncio.run(_load(url, 3.0))  # warm-up: links, pools, first allocations
    before = {n.home.name: rss_mb(n) for n in (front, host)}
    started = time.monotonic()
    done, errors, ttfb = asyncio.run(_load(url, DURATION_S))
    elapsed = time.monotonic() - started
    after = {n.home.name: rss_mb(n) for n in (front, host)}
    p50 = statistics.median(ttfb) * 1000
    p99 = statistics.quantiles(ttfb, n=100)[98] * 1000
    print(
        f"\n{CONCURRENT} concurrent streams for {elapsed:.0f} s through a client node: "
        f"{done} requests ({done / elapsed:.0f}/s), {len(errors)} errors, "
        f"TTFB p50 {p50:.0f} ms p99 {p99:.0f} ms; RSS MB before/after: "
        + ", ".join(f"{name} {before[name]:.0f}/{after[name]:.0f}" for name in before)
    )
    assert errors == [], errors[:10]
    assert done >= CONCURRENT  # every client finished at least one request
    for name in before:
        assert after[name] - before[name] <= RSS_GROWTH_BOUND_MB, (name, before, after)
    assert front.proc is not None and front.proc.poll() is None
    assert host.proc is not None and host.proc.poll() is None
