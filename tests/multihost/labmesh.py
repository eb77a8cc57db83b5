"""Real `mesh-llm` nodes on lab hosts: start them with `ip netns exec`, each with its own home,
the real demo models and llama.cpp binaries; talk to them from inside their namespace.

`LabMesh.close()` stops every node it started (by pid) before the lab's namespaces go.
"""

from __future__ import annotations

import json
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from mesh_llm.backend.build import Binaries
from mesh_llm.token import InviteToken, decode_token, encode_token
from tests.e2e.harness import wait_until
from tests.multihost.netlab import Host, NetnsMeshProcess, enter_netns

CHAT_TIMEOUT_S = 120.0
LOAD_CHAT_TIMEOUT_S = 60.0


class LabMesh:
    """Nodes started by one test on lab hosts; every one is stopped in `close()`."""

    def __init__(self, root: Path, binaries: Binaries, models_dir: Path) -> None:
        self.root = root
        self.common = [
            *("--models-dir", str(models_dir)),
            *("--bin-dir", str(binaries.llama_server.parent)),
            *("--log-format", "json"),
        ]
        self.nodes: list[NetnsMeshProcess] = []

    def start(
        self, host: Host, *args: str, name: str | None = None, env: dict[str, str] | None = None
    ) -> NetnsMeshProcess:
        node = NetnsMeshProcess(self.root / (name or host.name), [*args, *self.common], host=host)
        node.env = env or {}
        self.nodes.append(node)
        node.start()
        return node

    def seed(
        self, host: Host, *args: str, env: dict[str, str] | None = None
    ) -> tuple[NetnsMeshProcess, str]:
        node = self.start(host, *args, env=env)
        wait_until(lambda: bool(node.status().get("token")), 60, f"a token from {host.name}")
        token: str = node.status()["token"]
        return node, token

    def close(self) -> None:
        for node in self.nodes:
            node.stop()


def token_with_addrs(token: str, addrs: list[str]) -> str:
    """`token` with its address list replaced (to add stale or unreachable addresses)."""
    t = decode_token(token)
    return encode_token(InviteToken(t.mesh_id, t.secret, t.node_id, tuple(addrs), t.version))


def peer_of(node: NetnsMeshProcess, node_id: str) -> dict[str, Any] | None:
    return next((p for p in node.status().get("peers", []) if p["node_id"] == node_id), None)


def alive_peer_ids(node: NetnsMeshProcess) -> set[str]:
    return {p["node_id"] for p in node.status().get("peers", []) if p["state"] == "alive"}


def chat(node: NetnsMeshProcess, model: str, max_tokens: int = 8) -> dict[str, Any]:
    """One chat completion through `node`'s API (from inside its namespace); the reply JSON.
    Raises urllib's HTTPError for an error status."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Say hello."}],
            "max_tokens": max_tokens,
        }
    ).encode()

    def send() -> dict[str, Any]:
        request = urllib.request.Request(
            node.base_url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=CHAT_TIMEOUT_S) as response:
            reply: dict[str, Any] = json.loads(response.read())
            return reply

    assert node.host is not None
    return node.host.call(send)


def stream_timing(node: NetnsMeshProcess, model: str, max_tokens: int = 64) -> tuple[float, float]:
    """One streamed completion through `node`'s API: (time to first token in s, tokens/s
    after it), counting content events."""
    body = json.dumps(
        {"model": model, "prompt": "Once upon a time", "max_tokens": max_tokens, "stream": True}
    ).encode()

    def send() -> tuple[float, float]:
        request = urllib.request.Request(
            node.base_url + "/v1/completions",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        started = time.monotonic()
        stamps: list[float] = []
        with urllib.request.urlopen(request, timeout=CHAT_TIMEOUT_S) as response:
            for line in response:
                if line.startswith(b"data: {") and b'"text":""' not in line:
                    stamps.append(time.monotonic())
        assert len(stamps) >= 2, f"only {len(stamps)} tokens streamed"
        return stamps[0] - started, (len(stamps) - 1) / (stamps[-1] - stamps[0])

    assert node.host is not None
    return node.host.call(send)


def chat_ok(node: NetnsMeshProcess, model: str) -> bool:
    """True when a chat through `node` for `model` is answered with tokens."""
    try:
        reply = chat(node, model)
    except urllib.error.HTTPError as exc:
        exc.close()  # an unclosed error response is a ResourceWarning (an error in pytest)
        return False
    except (urllib.error.URLError, OSError, ValueError):
        return False
    return int(reply.get("usage", {}).get("completion_tokens", 0)) > 0


def timed(fn: Any) -> float:
    started = time.monotonic()
    fn()
    return time.monotonic() - started


def wait_polling(condition: Any, timeout_s: float, what: str, every_s: float = 2.0) -> float:
    """`wait_until` for conditions that cost something (a chat): polled every `every_s`.
    Returns the seconds it took."""
    started = time.monotonic()
    deadline = started + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(every_s)
    return time.monotonic() - started


def split_ready(host: NetnsMeshProcess, timeout_s: float) -> None:
    """Wait for `host` to run a split llama-server (with --rpc) that is ready."""
    wait_until(lambda: "--rpc" in host.llama_argv(), timeout_s, "a split llama-server")
    host.wait_ready(timeout_s)


def status_text(node: NetnsMeshProcess) -> str:
    """What `mesh-llm status` prints for `node`, run inside its namespace."""
    assert node.host is not None
    return node.host.run(
        *("env", "COLUMNS=250", sys.executable, "-m", "mesh_llm", "status"),
        *("--console", str(node.console_port)),
    )


class ChatLoad:
    """Steady chat load through one node: `workers` threads inside its namespace, each sending
    one chat after another until `stop()`; every outcome is kept as (start, end, ok)."""

    def __init__(
        self, node: NetnsMeshProcess, model: str, workers: int = 2, max_tokens: int = 4
    ) -> None:
        self.node, self.model, self.max_tokens = node, model, max_tokens
        self.outcomes: list[tuple[float, float, bool]] = []
        self._stop = threading.Event()
        assert node.host is not None
        ns = node.host.ns
        self._threads = [
            threading.Thread(target=self._run, args=(ns,), daemon=True) for _ in range(workers)
        ]

    def start(self) -> ChatLoad:
        for thread in self._threads:
            thread.start()
        return self

    def _run(self, ns: str) -> None:
        enter_netns(ns)
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                ok = _chat_here(self.node, self.model, LOAD_CHAT_TIMEOUT_S, self.max_tokens)
            except urllib.error.HTTPError as exc:
                exc.close()
                ok = False
            except (urllib.error.URLError, OSError, ValueError):
                ok = False
            self.outcomes.append((started, time.monotonic(), ok))

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(LOAD_CHAT_TIMEOUT_S + 5)

    def errors_between(self, start: float, end: float) -> tuple[int, int]:
        """(failed, total) of the requests started in [start, end)."""
        window = [ok for t, _, ok in self.outcomes if start <= t < end]
        return window.count(False), len(window)

    def errors_finished_before(self, moment: float) -> tuple[int, int]:
        window = [ok for _, end, ok in self.outcomes if end < moment]
        return window.count(False), len(window)

    def errors_in_flight_at(self, moment: float) -> tuple[int, int]:
        window = [ok for t, end, ok in self.outcomes if t < moment <= end]
        return window.count(False), len(window)


def _chat_here(node: NetnsMeshProcess, model: str, timeout_s: float, max_tokens: int) -> bool:
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Hi."}], "max_tokens": max_tokens}
    ).encode()
    request = urllib.request.Request(
        node.base_url + "/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=timeout_s) as response:
        reply = json.loads(response.read())
    return int(reply.get("usage", {}).get("completion_tokens", 0)) > 0
