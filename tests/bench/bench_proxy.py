"""Benchmark: the proxy path alone, with a fake llama-server that streams as fast as it can.

Starts host A (`--model gemma-3-270m` with `--llama-server-path` pointing at
`tests/fakes/fake_llama_server.py`) and a passive client C joined to it. Measures, in one run:
1. SSE events per second of one long stream: direct to the fake, through A's API (local
   route), and through C's API (remote route: one QUIC hop).
2. 100 concurrent streaming requests through C for 30 s (each 200 events, 5 ms apart): requests
   completed, errors, events/s, and the RSS of A and C before and after.
Run with `python -m tests.bench.bench_proxy` (part of `just bench`).
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from mesh_llm.models.demo import install_demo_model
from tests.e2e.harness import MeshProcess, wait_until
from tests.fakes.fake_llama_server import write_wrapper

LONG_STREAM_EVENTS = 20000
CONCURRENT = 100
SOAK_S = 30.0
SOAK_EVENTS = 200
SOAK_DELAY_S = 0.005
BODY = {"model": "gemma-3-270m", "messages": [{"role": "user", "content": "hi"}], "stream": True}


async def count_events(session: aiohttp.ClientSession, base: str) -> int:
    events = 0
    async with session.post(base + "/v1/chat/completions", json=BODY) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {await response.text()}")
        async for line in response.content:
            if line.startswith(b"data: "):
                events += 1
    return events


async def events_per_s(base: str) -> float:
    async with aiohttp.ClientSession() as session:
        await count_events(session, base)  # warm-up (connections, on-demand QUIC link)
        started = time.perf_counter()
        events = await count_events(session, base)
        return events / (time.perf_counter() - started)


async def soak(base: str) -> tuple[int, int, int]:
    """(requests completed, errors, events) of CONCURRENT looping clients for SOAK_S."""
    done = errors = events = 0
    deadline = time.monotonic() + SOAK_S
    connector = aiohttp.TCPConnector(limit=CONCURRENT)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal done, errors, events
            while time.monotonic() < deadline:
                try:
                    got = await count_events(session, base)
                except (aiohttp.ClientError, RuntimeError) as exc:
                    errors += 1
                    print(f"  error: {exc!r}")
                    continue
                if got != SOAK_EVENTS + 1:  # + [DONE]
                    errors += 1
                    print(f"  short stream: {got} events")
                done += 1
                events += got

        await asyncio.gather(*(worker() for _ in range(CONCURRENT)))
    return done, errors, events


def rss_mb(node: MeshProcess) -> float:
    assert node.proc is not None
    return psutil.Process(node.proc.pid).memory_info().rss / 2**20


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-proxy-") as tmp:
        root = Path(tmp)
        install_demo_model(root / "models", None)
        fake = write_wrapper(root / "fake-bin")
        common = ["--models-dir", str(root / "models"), "--llama-server-path", str(fake)]
        env = {"FAKE_LLAMA_CHUNKS": str(LONG_STREAM_EVENTS)}
        host = MeshProcess(root / "a", ["--model", "gemma-3-270m", *common], env=env).start()
        client: MeshProcess | None = None
        try:
            host.wait_ready()
            wait_until(lambda: bool(host.status().get("token")), 30, "token")
            token = host.status()["token"]
            client = MeshProcess(root / "c", ["--client", "--join", token]).start()
            client.wait_ready()
            direct = f"http://127.0.0.1:{host.llama_server_port()}"
            rates = {
                "direct": asyncio.run(events_per_s(direct)),
                "local": asyncio.run(events_per_s(host.base_url)),
                "remote": asyncio.run(events_per_s(client.base_url)),
            }
            print(f"one stream of {LONG_STREAM_EVENTS} SSE events, fake upstream, events/s:")
            for key, rate in rates.items():
                print(f"  {key:6s} {rate:9.0f} events/s  ({rate / rates['direct']:.2f} of direct)")
        finally:
            if client is not None:
                client.stop()
            host.stop()
        # The soak: a fake that streams SOAK_EVENTS events SOAK_DELAY_S apart.
        env = {"FAKE_LLAMA_CHUNKS": str(SOAK_EVENTS), "FAKE_LLAMA_DELAY_S": str(SOAK_DELAY_S)}
        host = MeshProcess(root / "a2", ["--model", "gemma-3-270m", *common], env=env).start()
        client = None
        try:
            host.wait_ready()
            wait_until(lambda: bool(host.status().get("token")), 30, "token")
            client = MeshProcess(root / "c2", ["--client", "--join", host.status()["token"]])
            client.start().wait_ready()
            asyncio.run(events_per_s(client.base_url))  # warm-up
            before = (rss_mb(host), rss_mb(client))
            started = time.monotonic()
            done, errors, events = asyncio.run(soak(client.base_url))
            elapsed = time.monotonic() - started
            after = (rss_mb(host), rss_mb(client))
            print(
                f"{CONCURRENT} concurrent streams through the remote route for {elapsed:.0f} s: "
                f"{done} requests, {errors} errors, {events / elapsed:.0f} events/s"
            )
            print(
                f"  RSS host {before[0]:.0f} -> {after[0]:.0f} MB, "
                f"client {before[1]:.0f} -> {after[1]:.0f} MB"
            )
        finally:
            if client is not None:
                client.stop()
            host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
