"""Benchmark: the web console — page load on a 5-node mesh, SSE capacity, memory under 20 pages.

1. A 5-node mesh of real processes: host A (`--model gemma-3-270m` on the fake llama-server of
   `tests/fakes/fake_llama_server.py`, so no model competes for the CPU) and four standby nodes
   joined to it. Chromium (Playwright, Debian's binary) loads A's console `PAGE_LOADS` times:
   time to `load` and to the first render of all five node cards (median, max).
2. Events per second one `/api/events` stream carries: an in-process console app on 127.0.0.1
   whose event hub is fed as fast as the loop allows for `BURST_S` seconds, read by one aiohttp
   client (counts only `event:` messages that arrived).
3. RSS of node A while 20 aiohttp clients hold `/api/events` open for `HOLD_S` seconds (15 read
   everything, 5 never read: slow pages), sampled every 30 s; and the status messages/s and
   bytes/s one reading page received.
Run with `python -m tests.bench.bench_console` (`HOLD_S` can be shortened with an argument).
"""

from __future__ import annotations

import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil
from playwright.sync_api import sync_playwright

from mesh_llm.api.console import HUB_KEY, create_console_app
from mesh_llm.models.demo import install_demo_model
from tests.e2e.harness import MeshProcess, wait_until
from tests.fakes.fake_llama import serve
from tests.fakes.fake_llama_server import write_wrapper

PAGE_LOADS = 5
STANDBY_NODES = 4
BURST_S = 5.0
HOLD_S = 300.0
SUBSCRIBERS = 20
SLOW_SUBSCRIBERS = 5
SAMPLE_EVERY_S = 30.0


def _mesh(root: Path) -> list[MeshProcess]:
    install_demo_model(root / "models", None)
    fake = write_wrapper(root / "fake-bin")
    common = ["--models-dir", str(root / "models"), "--llama-server-path", str(fake)]
    nodes = [MeshProcess(root / "a", ["--model", "gemma-3-270m", *common]).start()]
    nodes[0].wait_ready()
    wait_until(lambda: bool(nodes[0].status().get("token")), 30, "token")
    token = nodes[0].status()["token"]
    for index in range(STANDBY_NODES):
        nodes.append(MeshProcess(root / f"s{index}", ["--join", token, *common]).start())
    wait_until(lambda: len(nodes[0].peer_ids()) == STANDBY_NODES, 120, "four peers in A's view")
    wait_until(
        lambda: len(nodes[0].status().get("records", [])) == STANDBY_NODES + 1, 60, "records"
    )
    return nodes


def page_load(url: str) -> None:
    loads, rendered = [], []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--headless", "--no-sandbox", "--disable-gpu"],
        )
        try:
            for _ in range(PAGE_LOADS):
                context = browser.new_context()
                page = context.new_page()
                started = time.perf_counter()
                page.goto(url, wait_until="load")
                loads.append(time.perf_counter() - started)
                page.wait_for_function("document.querySelectorAll('#nodes .card').length === 5")
                rendered.append(time.perf_counter() - started)
                context.close()
        finally:
            browser.close()
    print(
        f"page load (5-node mesh, {PAGE_LOADS} loads): load event median "
        f"{statistics.median(loads) * 1000:.0f} ms (max {max(loads) * 1000:.0f}); "
        f"all 5 cards drawn median {statistics.median(rendered) * 1000:.0f} ms "
        f"(max {max(rendered) * 1000:.0f})"
    )


class _Quiet:
    def status(self) -> dict[str, object]:
        return {"node": {"node_id": "a" * 64}, "models": [], "peers": [], "records": []}


async def sse_capacity() -> None:
    app = create_console_app(_Quiet())
    hub = app[HUB_KEY]
    async with serve(app) as url, aiohttp.ClientSession() as session:
        response = await session.get(url + "/api/events")
        async with response:
            await response.content.readline()
            received = 0
            stop = asyncio.get_running_loop().time() + BURST_S

            async def feed() -> None:
                while asyncio.get_running_loop().time() < stop:
                    for _ in range(50):
                        hub.publish({"event": "bench", "message": "x" * 60})
                    await asyncio.sleep(0)

            async def read() -> None:
                nonlocal received
                async for line in response.content:
                    if line.startswith(b"event: event"):
                        received += 1
                    if asyncio.get_running_loop().time() >= stop:
                        return

            async with asyncio.TaskGroup() as group:
                group.create_task(feed())
                group.create_task(read())
    print(
        f"SSE capacity: {hub.published / BURST_S:.0f} events/s published, "
        f"{received / BURST_S:.0f} events/s delivered to one stream (the rest dropped as oldest)"
    )


async def hold_subscribers(node: MeshProcess, hold_s: float) -> None:
    url = f"http://127.0.0.1:{node.console_port}/api/events"
    assert node.proc is not None
    process = psutil.Process(node.proc.pid)
    before = process.memory_info().rss
    counts = {"status": 0, "bytes": 0}

    async def reader(session: aiohttp.ClientSession, first: bool) -> None:
        async with session.get(url) as response:
            async for line in response.content:
                if first:
                    counts["bytes"] += len(line)
                    counts["status"] += line.startswith(b"event: status")

    async def idle(session: aiohttp.ClientSession) -> None:
        async with session.get(url) as response:
            assert response.status == 200
            await asyncio.sleep(hold_s + 5)  # never reads: a slow page

    samples = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = [
            asyncio.create_task(reader(session, index == 0))
            for index in range(SUBSCRIBERS - SLOW_SUBSCRIBERS)
        ] + [asyncio.create_task(idle(session)) for _ in range(SLOW_SUBSCRIBERS)]
        started = time.monotonic()
        try:
            while (elapsed := time.monotonic() - started) < hold_s:
                await asyncio.sleep(min(SAMPLE_EVERY_S, hold_s - elapsed))
                samples.append(process.memory_info().rss)
                print(f"  {time.monotonic() - started:5.0f} s: RSS {samples[-1] / 2**20:.1f} MiB")
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    elapsed = time.monotonic() - started
    print(
        f"{SUBSCRIBERS} console streams ({SLOW_SUBSCRIBERS} never reading) for {elapsed:.0f} s: "
        f"RSS {before / 2**20:.1f} MiB before, {samples[0] / 2**20:.1f} at the first sample, "
        f"{max(samples) / 2**20:.1f} max, {samples[-1] / 2**20:.1f} at the end; one page got "
        f"{counts['status'] / elapsed:.2f} status messages/s, {counts['bytes'] / elapsed:.0f} B/s"
    )


def main() -> None:
    hold_s = float(sys.argv[1]) if len(sys.argv) > 1 else HOLD_S
    asyncio.run(sse_capacity())
    with tempfile.TemporaryDirectory() as tmp:
        nodes = _mesh(Path(tmp))
        try:
            page_load(f"http://127.0.0.1:{nodes[0].console_port}/")
            asyncio.run(hold_subscribers(nodes[0], hold_s))
        finally:
            for node in nodes:
                node.stop()


if __name__ == "__main__":
    main()
