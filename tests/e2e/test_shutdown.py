"""End-to-end: a node's drain on Ctrl-C, with real processes, real llama-server, the demo model.

On the first SIGINT a node refuses new requests with 503, lets the streams in flight finish
with `[DONE]` within `shutdown_grace_s` — its own clients' and those it serves for other nodes
(a client node over the fast lane, another over QUIC) — then leaves the mesh, stops
llama-server and exits 0. A second SIGINT during the grace kills the children and exits at
once. Either way no child survives: its pids are read from the node's process tree before the
signal.
"""

from __future__ import annotations

import http.client
import json
import signal
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, wait_until
from tests.e2e.models import SMOLLM2
from tests.e2e.test_solo import DEMO_MODEL, PROMPT

pytestmark = pytest.mark.e2e

GRACE_S = 150  # long enough for the streams below on a busy shared CPU (load 10 on 2 cores)
STREAM_TOKENS = 48
CHILD_EXIT_TIMEOUT_S = 10.0
FORCED_EXIT_TIMEOUT_S = 10.0
EXIT_FORCED = 130


class Nodes:
    def __init__(self, root: Path, binaries: Binaries, models_dir: Path) -> None:
        self.root = root
        self.common = [
            "--models-dir",
            str(models_dir),
            "--bin-dir",
            str(binaries.llama_server.parent),
        ]
        self.started: list[MeshProcess] = []

    def start(self, name: str, *args: str, env: dict[str, str] | None = None) -> MeshProcess:
        home = self.root / name
        home.mkdir(parents=True)
        (home / "config.toml").write_text(f"shutdown_grace_s = {GRACE_S}\n")
        node = MeshProcess(home, [*args, *self.common, "--log-format", "json"], env=env or {})
        self.started.append(node.start())
        return node


@pytest.fixture
def nodes(tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path) -> Iterator[Nodes]:
    made = Nodes(tmp_path, llama_binaries, demo_models_dir)
    try:
        yield made
    finally:
        for node in made.started:
            node.stop()


def _open_stream(
    port: int, max_tokens: int
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    body = {
        "model": DEMO_MODEL,
        "messages": PROMPT,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
    }
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200, response.read()
    return connection, response


def _read_events(response: http.client.HTTPResponse, count: int) -> list[str]:
    """`count` SSE data lines (fewer if the stream ends first)."""
    events: list[str] = []
    while len(events) < count:
        line = response.readline()
        if not line:
            break
        if line.startswith(b"data: "):
            events.append(line.decode().strip())
    return events


def _rest(response: http.client.HTTPResponse) -> list[str]:
    try:
        text = response.read().decode()
    except (http.client.IncompleteRead, OSError) as exc:
        partial = getattr(exc, "partial", b"")
        text = partial.decode() if isinstance(partial, bytes) else ""
    return [line for line in text.splitlines() if line.startswith("data: ")]


def _chat_status(port: int) -> tuple[int, dict[str, object]]:
    body = json.dumps({"model": DEMO_MODEL, "messages": PROMPT, "max_tokens": 4}).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/v1/chat/completions",
        data=body,
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _children(node: MeshProcess) -> list[psutil.Process]:
    children = [p for p in node.descendants() if p.name() == "llama-server"]
    assert children, "expected the node's llama-server among its children"
    return children


def _wait_gone(children: list[psutil.Process]) -> None:
    def gone() -> bool:
        for child in children:
            try:
                if child.status() != psutil.STATUS_ZOMBIE:
                    return False
            except psutil.NoSuchProcess:
                continue
        return True

    wait_until(gone, CHILD_EXIT_TIMEOUT_S, f"children {[c.pid for c in children]} to exit")


def _wait_draining(node: MeshProcess) -> None:
    wait_until(lambda: bool(node.status().get("node", {}).get("draining")), 10, "the node to drain")


def _assert_complete(events: list[str]) -> None:
    assert events and events[-1] == "data: [DONE]", events[-3:]
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    reasons = [c["choices"][0].get("finish_reason") for c in chunks if c.get("choices")]
    assert "length" in reasons, reasons[-3:]  # generated all its tokens: nothing was cut


def test_ctrl_c_lets_local_and_mesh_streams_finish(nodes: Nodes) -> None:
    host = nodes.start("host", "--model", SMOLLM2.catalog)
    token_wait = host.wait_status
    wait_until(lambda: bool(token_wait().get("token")), 30, "invite token")
    token = host.status()["token"]
    over_lane = nodes.start("lane-client", "--client", "--join", token)
    over_quic = nodes.start(
        "quic-client", "--client", "--join", token, env={"MESH_LLM_API_FAST_LANE": "0"}
    )
    host.wait_ready()
    for client in (over_lane, over_quic):
        client.wait_ready(local=False)
    children = _children(host)
    streams = [_open_stream(n.port, STREAM_TOKENS) for n in (host, over_lane, over_quic)]
    starts = [_read_events(response, 3) for _, response in streams]
    assert all(len(events) == 3 for events in starts), starts
    assert over_lane.status()["api_lanes"]["fast"] >= 1
    quic_only = over_quic.status()["api_lanes"]  # MESH_LLM_API_FAST_LANE=0: QUIC only
    assert quic_only["fast"] == 0 and quic_only["quic"] >= 1, quic_only

    host.signal(signal.SIGINT)
    signalled = time.monotonic()
    _wait_draining(host)
    status, body = _chat_status(host.port)  # new requests: 503 during the drain
    assert status == 503, body
    assert body["error"]["code"] == "shutting_down"  # type: ignore[index]
    status, body = _chat_status(over_lane.port)  # the client's request reaches the draining host
    assert status == 503, body

    for (connection, response), start in zip(streams, starts, strict=True):
        _assert_complete(start + _rest(response))
        connection.close()
    assert host.wait_exit(GRACE_S) == 0
    print(f"host exited {time.monotonic() - signalled:.1f} s after SIGINT")
    assert time.monotonic() - signalled < GRACE_S
    _wait_gone(children)
    assert "drain_expired" not in host.log_text()


def test_second_ctrl_c_forces_exit(nodes: Nodes) -> None:
    node = nodes.start("solo", "--model", SMOLLM2.catalog)
    node.wait_ready()
    children = _children(node)
    connection, response = _open_stream(node.port, 2000)
    assert len(_read_events(response, 3)) == 3
    node.signal(signal.SIGINT)
    _wait_draining(node)  # the first signal's drain waits for the 2000-token stream
    forced = time.monotonic()
    node.signal(signal.SIGINT)
    assert node.wait_exit(FORCED_EXIT_TIMEOUT_S) == EXIT_FORCED
    assert time.monotonic() - forced < FORCED_EXIT_TIMEOUT_S
    _wait_gone(children)
    rest = _rest(response)
    assert "data: [DONE]" not in rest  # cut: the forced exit did not wait for it
    connection.close()
