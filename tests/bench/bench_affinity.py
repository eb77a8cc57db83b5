"""Benchmark: KV-cache affinity with two replicas of a real model, same run, on and off.

Two serving nodes run the demo model (two replicas, each its own llama-server); two passive
`--client` nodes join, one with prefix affinity (the default), one with it off
(`api.prefix_affinity = false`: least in-flight, ties rotate). Leg 1 (per client, each with its
own fresh system prompt so both start cold): 3 "conversations" sharing a ~1,500-token system
prompt, 8 turns each, interleaved (24 sequential streaming requests; each turn carries the
conversation so far). Reported: median time to first token (TTFT), total prompt-processing time
and prompt tokens processed as llama-server reports them (`timings`), requests per replica.
Leg 2: 6 requests that all have different ~1,500-token prefixes, 2 at a time: wall time with
affinity vs without (affinity must not cost throughput). Absolute times depend on the machine
(a shared, noisy CPU here): compare the ratios. Run with `python -m tests.bench.bench_affinity`
(part of `just bench`).
"""

from __future__ import annotations

import http.client
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from mesh_llm.backend.build import ensure_binaries
from mesh_llm.config import BackendConfig, load_config
from mesh_llm.models.demo import install_demo_model
from tests.e2e.harness import MeshProcess, wait_until

MODEL = "gemma-3-270m"  # the model of both replicas (a base model: answers capped)
CONVERSATIONS = 3
TURNS = 8
MAX_TOKENS = 6
UNIQUE_REQUESTS = 6
UNIQUE_CONCURRENCY = 2
SYSTEM_RULES = 40  # ≈ 1,500 tokens of system prompt with gemma's tokenizer (printed below)
READY_TIMEOUT_S = 300.0


@dataclass(frozen=True, slots=True)
class Sample:
    ttft_s: float
    total_s: float
    prompt_ms: float
    prompt_tokens: int
    reply: str


def system_prompt(salt: str) -> str:
    rules = [
        f"Rule {i} ({salt}): when a question touches subject number {i * 7 % 97}, answer in at "
        f"most {i % 5 + 2} short sentences, name the rule, and never invent a source."
        for i in range(SYSTEM_RULES)
    ]
    return "You are the help desk of a small library.\n" + "\n".join(rules)


def stream_chat(port: int, messages: list[dict[str, str]]) -> Sample:
    """One streaming chat request; TTFT is the first content chunk."""
    body = json.dumps(
        {"model": MODEL, "messages": messages, "max_tokens": MAX_TOKENS, "stream": True}
    )
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.monotonic()
    first: float | None = None
    pieces: list[str] = []
    timings: dict[str, Any] = {}
    try:
        connection.request(
            "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
        for raw in response:
            line = raw.strip()
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            event = json.loads(line[len(b"data: ") :])
            timings = event.get("timings") or timings
            for choice in event.get("choices", []):
                content = (choice.get("delta") or {}).get("content")
                if content is not None:
                    first = first if first is not None else time.monotonic()
                    pieces.append(content)
    finally:
        connection.close()
    ended = time.monotonic()
    return Sample(
        ttft_s=(first or ended) - started,
        total_s=ended - started,
        prompt_ms=float(timings.get("prompt_ms", 0.0)),
        prompt_tokens=int(timings.get("prompt_n", 0)),
        reply="".join(pieces),
    )


def conversations_leg(client: MeshProcess, salt: str) -> list[Sample]:
    system = {"role": "system", "content": system_prompt(salt)}
    histories: list[list[dict[str, str]]] = [[system] for _ in range(CONVERSATIONS)]
    samples = []
    for turn in range(TURNS):
        for index, history in enumerate(histories):
            history.append(
                {"role": "user", "content": f"Conversation {index}, question {turn}: which rule?"}
            )
            sample = stream_chat(client.port, history)
            history.append({"role": "assistant", "content": sample.reply})
            samples.append(sample)
    return samples


def unique_leg(client: MeshProcess, salt: str) -> float:
    def one(index: int) -> Sample:
        messages = [
            {"role": "system", "content": system_prompt(f"{salt}-{index}")},
            {"role": "user", "content": "Which rule applies?"},
        ]
        return stream_chat(client.port, messages)

    started = time.monotonic()
    with ThreadPoolExecutor(UNIQUE_CONCURRENCY) as pool:
        list(pool.map(one, range(UNIQUE_REQUESTS)))
    return time.monotonic() - started


def replica_counts(hosts: list[MeshProcess]) -> list[float]:
    """Requests each host answered for other nodes (its /metrics)."""
    counts = []
    for host in hosts:
        connection = http.client.HTTPConnection("127.0.0.1", host.port, timeout=10)
        try:
            connection.request("GET", "/metrics")
            text = connection.getresponse().read().decode()
        finally:
            connection.close()
        counts.append(
            sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("mesh_llm_peer_requests_total{")
            )
        )
    return counts


def replicas_known(client: MeshProcess) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=5)
    try:
        connection.request("GET", "/v1/models")
        data = json.loads(connection.getresponse().read())["data"]
    except (OSError, ValueError):
        return False
    finally:
        connection.close()
    return any(m["meta"]["nodes"] == 2 and m["meta"]["state"] == "warm" for m in data)


def summarize(name: str, samples: list[Sample], per_replica: list[float]) -> dict[str, float]:
    ttft = statistics.median(s.ttft_s for s in samples)
    prompt_s = sum(s.prompt_ms for s in samples) / 1000
    tokens = sum(s.prompt_tokens for s in samples)
    replicas = ", ".join(f"{c:.0f}" for c in per_replica)
    print(
        f"  {name:<17} median TTFT {ttft * 1000:7.0f} ms   prompt processing {prompt_s:6.2f} s "
        f"({tokens} tokens)   requests per replica: {replicas}"
    )
    return {"ttft": ttft, "prompt_s": prompt_s}


def main() -> int:
    binaries = ensure_binaries(BackendConfig(), load_config().cache_dir)
    with tempfile.TemporaryDirectory(prefix="mesh-llm-bench-") as tmp:
        root = Path(tmp)
        models = root / "models"
        install_demo_model(models, None)
        common = ["--models-dir", str(models), "--bin-dir", str(binaries.llama_server.parent)]
        nodes: list[MeshProcess] = []
        try:
            a = MeshProcess(root / "a", ["--model", MODEL, *common]).start()
            nodes.append(a)
            wait_until(lambda: bool(a.status().get("token")), 30, "seed token")
            token = a.status()["token"]
            b = MeshProcess(root / "b", ["--model", MODEL, "--join", token, *common]).start()
            nodes.append(b)
            on = MeshProcess(root / "on", ["--client", "--join", token, *common]).start()
            (root / "off").mkdir()
            (root / "off" / "config.toml").write_text("[api]\nprefix_affinity = false\n")
            off = MeshProcess(root / "off", ["--client", "--join", token, *common]).start()
            nodes += [on, off]
            for node in (a, b):
                node.wait_ready(READY_TIMEOUT_S)
            for client in (on, off):
                wait_until(partial(replicas_known, client), 60, "both replicas on a client")
            tokens = tokenize_count(on, system_prompt("probe"))
            print(
                f"KV-cache affinity, 2 replicas of {MODEL} (system prompt {tokens} tokens, "
                f"{CONVERSATIONS} conversations × {TURNS} turns, interleaved, sequential):"
            )
            results = {}
            for name, client in (("without affinity", off), ("with affinity", on)):
                before = replica_counts([a, b])
                samples = conversations_leg(client, salt=name)
                after = replica_counts([a, b])
                delta = [x - y for x, y in zip(after, before, strict=True)]
                results[name] = summarize(name, samples, delta)
            plain, steered = results["without affinity"], results["with affinity"]
            print(
                f"  → affinity: median TTFT ×{plain['ttft'] / steered['ttft']:.1f} lower, "
                f"prompt processing ×{plain['prompt_s'] / max(steered['prompt_s'], 1e-9):.1f} less"
            )
            print(
                f"All-different prefixes ({UNIQUE_REQUESTS} requests, {UNIQUE_CONCURRENCY} at a "
                "time):"
            )
            walls = {}
            for name, client in (("without affinity", off), ("with affinity", on)):
                walls[name] = unique_leg(client, salt=f"unique-{name}")
                print(f"  {name:<17} wall time {walls[name]:6.2f} s")
            ratio = walls["without affinity"] / walls["with affinity"]
            print(f"  → throughput with affinity ×{ratio:.2f} of without")
        finally:
            for node in nodes:
                node.stop()
    return 0


def tokenize_count(client: MeshProcess, text: str) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    try:
        body = json.dumps({"model": MODEL, "content": text})
        connection.request("POST", "/tokenize", body, {"Content-Type": "application/json"})
        return len(json.loads(connection.getresponse().read())["tokens"])
    finally:
        connection.close()


if __name__ == "__main__":
    sys.exit(main())
