"""Benchmark: the proxy path alone, with a fake llama-server that streams as fast as it can.

Starts host A (`--model gemma-3-270m` with `--llama-server-path` pointing at
`tests/fakes/fake_llama_server.py`) and a passive client C joined to it. Measures, in one run:
1. SSE events per second of one long stream: direct to the fake, through A's API (local
   route), through C's API (remote route: one hop over the fast lane) and through a second
   client whose API requests stay on QUIC streams (`MESH_LLM_API_FAST_LANE=0`).
2. 100 concurrent streaming requests through C (fast lane) for 30 s (each 200 events, 5 ms
   apart): requests completed, errors, events/s, and the RSS of A and C before and after.
3. Time to first byte of short streams (2 events), sequential, legs shuffled each round:
   the proxy's own added latency per route, without a model competing for the CPU.
4. `/v1/models` requests per second, sequential on one keep-alive connection, per route.
`measure` (1, 3 and 4, legs interleaved) is what the table of `just bench` shows; run
`python -m tests.bench.bench_proxy` for all four.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
LATENCY_ROUNDS = 200
LATENCY_EVENTS = 2
NAMES = {"remote": "remote (fast lane)", "quic": "remote (QUIC)"}
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


async def events_per_s(base: str, warm_up: bool = True) -> float:
    async with aiohttp.ClientSession() as session:
        if warm_up:
            await count_events(session, base)  # warm-up (connections, on-demand QUIC link)
        started = time.perf_counter()
        events = await count_events(session, base)
        return events / (time.perf_counter() - started)


def models_per_s(base: str, seconds: float) -> float:
    """Sequential `GET /v1/models` on one keep-alive connection for `seconds`: requests/s."""
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    done = 0
    started = time.perf_counter()
    try:
        while (elapsed := time.perf_counter() - started) < seconds:
            connection.request("GET", "/v1/models")
            response = connection.getresponse()
            body = response.read()
            if response.status != 200 or b'"data"' not in body:
                raise RuntimeError(f"/v1/models: HTTP {response.status}: {body[:200]!r}")
            done += 1
    finally:
        connection.close()
    return done / elapsed


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


@contextmanager
def topology(root: Path, name: str, env: dict[str, str]) -> Iterator[dict[str, MeshProcess]]:
    """Host A on the fake (`env` shapes its streams), client C on the fast lane, client Q
    whose API requests stay on QUIC; every process stopped on exit."""
    fake = write_wrapper(root / "fake-bin")
    common = ["--models-dir", str(root / "models"), "--llama-server-path", str(fake)]
    # The soak's 100 streams must not meet the default queue depth (64): it measures the proxy.
    args = ["--model", "gemma-3-270m", "--queue-depth", str(4 * CONCURRENT), *common]
    nodes = {"host": MeshProcess(root / f"{name}-a", args, env=env).start()}
    try:
        nodes["host"].wait_ready()
        wait_until(lambda: bool(nodes["host"].status().get("token")), 30, "token")
        join = ["--client", "--join", nodes["host"].status()["token"]]
        nodes["remote"] = MeshProcess(root / f"{name}-c", join).start()
        nodes["quic"] = MeshProcess(root / f"{name}-q", join, env={"MESH_LLM_API_FAST_LANE": "0"})
        nodes["quic"].start()
        for client in ("remote", "quic"):
            nodes[client].wait_ready()
        yield nodes
    finally:
        for node in reversed(nodes.values()):
            node.stop()


def bases(nodes: dict[str, MeshProcess]) -> dict[str, str]:
    return {
        "direct": f"http://127.0.0.1:{nodes['host'].llama_server_port()}",
        "local": nodes["host"].base_url,
        "remote": nodes["remote"].base_url,
        "quic": nodes["quic"].base_url,
    }


def first_byte_s(base: str) -> float:
    host, port = base.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    started = time.perf_counter()
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(BODY), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    first = 0.0
    for line in response:
        if not first and line.startswith(b"data: "):
            first = time.perf_counter() - started
    connection.close()
    return first


Samples = dict[str, list[float]]


def measure_rates(root: Path, runs: int, events: int = LONG_STREAM_EVENTS) -> Samples:
    """Events/s of one long stream per route, `runs` rounds, routes shuffled each round."""
    with topology(root, "rate", {"FAKE_LLAMA_CHUNKS": str(events)}) as nodes:
        urls = bases(nodes)
        for base in urls.values():
            asyncio.run(events_per_s(base, warm_up=False))  # connections, on-demand links
        samples: Samples = {key: [] for key in urls}
        order, shuffle = list(urls), random.Random(1).shuffle
        for _ in range(runs):
            shuffle(order)
            for key in order:
                samples[key].append(asyncio.run(events_per_s(urls[key], warm_up=False)))
    return samples


def measure_latency(root: Path, rounds: int, models_s: float) -> tuple[Samples, Samples]:
    """(time to first byte s of `rounds` short streams per route, `/v1/models` requests/s of
    `models_s`-second runs, five per route), routes shuffled each round."""
    with topology(root, "latency", {"FAKE_LLAMA_CHUNKS": str(LATENCY_EVENTS)}) as nodes:
        urls = bases(nodes)
        for base in urls.values():
            first_byte_s(base)  # warm-up: connections, on-demand links
        samples: Samples = {key: [] for key in urls}
        order, shuffle = list(urls), random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for key in order:
                samples[key].append(first_byte_s(urls[key]))
        models: Samples = {key: [] for key in urls if key != "direct"}
        order = list(models)
        for _ in range(5):
            shuffle(order)
            for key in order:
                models[key].append(models_per_s(urls[key], models_s))
    return samples, models


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-proxy-") as tmp:
        root = Path(tmp)
        install_demo_model(root / "models", None)
        rates = {key: statistics.median(v) for key, v in measure_rates(root, 3).items()}
        print(f"one stream of {LONG_STREAM_EVENTS} SSE events, fake upstream, events/s:")
        for key, rate in rates.items():
            name = NAMES.get(key, key)
            print(f"  {name:18s} {rate:9.0f} events/s  ({rate / rates['direct']:.2f} of direct)")

        samples, models = measure_latency(root, LATENCY_ROUNDS, 2.0)
        medians = {key: statistics.median(v) * 1000 for key, v in samples.items()}
        print(f"time to first byte, {LATENCY_ROUNDS} short streams per route, medians:")
        for key, median in medians.items():
            added = median - medians["direct"]
            print(f"  {NAMES.get(key, key):18s} {median:6.2f} ms  ({added:+.2f} ms)")
        for key, values in models.items():
            print(f"  /v1/models {NAMES.get(key, key):18s} {statistics.median(values):7.0f} req/s")

        soak_env = {"FAKE_LLAMA_CHUNKS": str(SOAK_EVENTS), "FAKE_LLAMA_DELAY_S": str(SOAK_DELAY_S)}
        with topology(root, "soak", soak_env) as nodes:
            client = nodes["remote"]
            asyncio.run(events_per_s(client.base_url))  # warm-up
            before = (rss_mb(nodes["host"]), rss_mb(client))
            started = time.monotonic()
            done, errors, events = asyncio.run(soak(client.base_url))
            elapsed = time.monotonic() - started
            after = (rss_mb(nodes["host"]), rss_mb(client))
            lanes = client.status()["api_lanes"]
        print(
            f"{CONCURRENT} concurrent streams through the remote route (fast lane) for "
            f"{elapsed:.0f} s: {done} requests, {errors} errors, {events / elapsed:.0f} events/s "
            f"(lane: {lanes['fast']} requests, QUIC: {lanes['quic']})"
        )
        print(
            f"  RSS host {before[0]:.0f} -> {after[0]:.0f} MB, "
            f"client {before[1]:.0f} -> {after[1]:.0f} MB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
