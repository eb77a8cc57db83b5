"""End-to-end API routing across the mesh: real nodes, real llama-server, the two real models.

Topology (module scope): host A serves `smollm2-135m` and wants `gemma-3-270m` and a model
nobody has; host B serves `gemma-3-270m`; C is a passive `--client` with a 30 s first-byte
timeout. Requests for both models from every node and from the client,
streaming and not, with the official `openai` client; one keep-alive connection switching
models; every error code with a real request; a client disconnect freeing the remote slot;
`mesh-llm drop` from the client. A separate topology kills a replica's host mid-request.
"""

from __future__ import annotations

import http.client
import json
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, Nodes, wait_until
from tests.e2e.models import GEMMA, SMOLLM2

pytestmark = pytest.mark.e2e

DEMO = SMOLLM2.catalog  # served by host A
COPY = GEMMA.catalog  # served by host B: a different real model
ABSENT = "absent-model"
CLIENT_FIRST_BYTE_S = 30  # generous: prompt processing on a loaded 2-core machine takes seconds
ROUTE_TIMEOUT_S = 30.0


def token_of(node: MeshProcess) -> str:
    wait_until(lambda: bool(node.status().get("token")), 30, "invite token")
    token: str = node.status()["token"]
    return token


def models_of(node: MeshProcess) -> dict[str, dict[str, Any]]:
    """/v1/models by model id and by every alias."""
    with urllib.request.urlopen(node.base_url + "/v1/models", timeout=5) as response:
        data = json.loads(response.read())["data"]
    return {name: m for m in data for name in (m["id"], *m["meta"]["aliases"])}


def warm(node: MeshProcess, *names: str) -> bool:
    try:
        found = models_of(node)
    except OSError:
        return False
    return all(found.get(n, {}).get("meta", {}).get("state") == "warm" for n in names)


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[tuple[MeshProcess, MeshProcess, MeshProcess]]:
    bin_dir = llama_binaries.llama_server.parent
    topology = Nodes(tmp_path_factory.mktemp("routing"), bin_dir, demo_models_dir)
    try:
        a = topology.start("a", "--model", DEMO, "--model", COPY, "--model", ABSENT)
        token = token_of(a)
        b = topology.start("b", "--model", COPY, "--join", token)
        c_home = topology.root / "c"
        c_home.mkdir()
        (c_home / "config.toml").write_text(
            f"[api]\nfirst_byte_timeout_s = {CLIENT_FIRST_BYTE_S}\n"
        )
        c = topology.start("c", "--client", "--join", token)
        a.wait_ready()
        b.wait_ready()
        for node in (a, b, c):
            wait_until(partial(warm, node, DEMO, COPY), ROUTE_TIMEOUT_S, "both models warm")
        yield a, b, c
    finally:
        topology.close()


def _chat(client: OpenAI, model: str, **extra: Any) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=8, **extra
    )
    return answer.choices[0].message.content or ""


def test_every_node_and_the_client_reach_both_models(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    for node in mesh:
        with OpenAI(base_url=node.base_url + "/v1", api_key="unused", max_retries=0) as client:
            for model in (DEMO, COPY):
                assert _chat(client, model).strip(), f"{model} from {node.home.name}"
                pieces = [
                    chunk.choices[0].delta.content or ""
                    for chunk in client.chat.completions.create(
                        model=model,
                        messages=[{"role": "user", "content": "Count to five."}],
                        max_tokens=12,
                        stream=True,
                    )
                    if chunk.choices
                ]
                assert len(pieces) >= 2 and "".join(pieces).strip(), (model, node.home.name, pieces)
    listed = models_of(mesh[2])
    assert listed[DEMO]["meta"]["nodes"] == 1 and listed[COPY]["meta"]["nodes"] == 1
    assert listed[ABSENT]["meta"]["state"] == "cold"
    # Every node asked the other host twice, the client both hosts twice: over the fast lane.
    for node, remote_requests in zip(mesh, (2, 2, 4), strict=True):
        lanes = node.status()["api_lanes"]
        assert lanes["fast"] >= remote_requests and lanes["quic_for_now"] == [], (node, lanes)
    shown = subprocess.run(
        [sys.executable, "-m", "mesh_llm", "status", "--console", str(mesh[2].console_port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "over the fast lane" in shown, shown
    # Host A answered B's and C's requests for its model, and counts them.
    with urllib.request.urlopen(mesh[0].base_url + "/metrics", timeout=10) as response:
        metrics = response.read().decode()
    served = [
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mesh_llm_peer_requests_total{") and 'status="200"' in line
    ]
    assert sum(served) >= 4, metrics


def test_one_keep_alive_connection_talks_to_both_models(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    client = mesh[2]
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    try:
        sockets = []
        for model in (DEMO, COPY, DEMO):
            body = {
                "model": model,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 4,
            }
            connection.request("POST", "/v1/chat/completions", json.dumps(body))
            response = connection.getresponse()
            answer = json.loads(response.read())
            assert response.status == 200, answer
            assert answer["choices"][0]["message"]["content"] is not None
            sockets.append(connection.sock)
        assert sockets[0] is sockets[1] is sockets[2]  # one TCP connection, three models
    finally:
        connection.close()


def _post(
    node: MeshProcess, body: bytes, path: str = "/v1/chat/completions"
) -> tuple[int, dict[str, Any], dict[str, str]]:
    request = urllib.request.Request(
        node.base_url + path, data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read()), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read()), dict(exc.headers)


def _chat_body(model: str, **extra: Any) -> bytes:
    return json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
    ).encode()


def test_errors_from_real_requests_are_openai_shaped(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    _a, b, client = mesh
    cases = [
        (b"{not json", 400, "not valid JSON"),
        (json.dumps({"model": COPY}).encode(), 400, "'messages' is required"),
        (json.dumps({"model": COPY, "messages": "hi"}).encode(), 400, "wrong type"),
        (b'{"model": "x", "pad": "' + b"a" * (17 * 2**20) + b'"}', 400, "too large"),
        (_chat_body("no-such-model"), 404, SMOLLM2.name),
        (_chat_body("no-such-model"), 404, GEMMA.name),
        (_chat_body(ABSENT), 503, "no node serves it yet"),
    ]
    for body, status, text in cases:
        got, answer, headers = _post(client, body)
        assert got == status, (status, answer)
        error = answer["error"]
        assert set(error) >= {"message", "type", "code"} and text in error["message"], error
        if status == 503:
            assert int(headers["Retry-After"]) > 0
    # 502: the only host of gemma-3-270m stops answering; the client's first-byte timeout fires.
    assert b.proc is not None
    b.signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        got, answer, _ = _post(client, _chat_body(COPY))
        assert got == 502, answer
        assert answer["error"]["code"] == "upstream_failed"
        assert time.monotonic() - started < CLIENT_FIRST_BYTE_S + 10
    finally:
        b.signal(signal.SIGCONT)
    wait_until(lambda: _post(client, _chat_body(COPY))[0] == 200, 30, "gemma-3-270m again")


def _slots_busy(node: MeshProcess) -> int:
    url = f"http://127.0.0.1:{node.llama_server_port()}/slots"
    with urllib.request.urlopen(url, timeout=5) as response:
        return sum(bool(slot["is_processing"]) for slot in json.loads(response.read()))


def test_client_disconnect_frees_the_slot_on_the_remote_host(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    _a, b, client = mesh
    body = _chat_body(COPY, stream=True, max_tokens=2000, ignore_eos=True)
    connection = http.client.HTTPConnection("127.0.0.1", client.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body)
        response = connection.getresponse()
        assert response.status == 200
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += response.read1(4096)
        assert _slots_busy(b) == 1  # generating 2000 tokens takes about a minute here
    finally:
        connection.close()  # the API client goes away mid-stream
    started = time.monotonic()
    wait_until(lambda: _slots_busy(b) == 0, 10, "the remote slot to free")
    print(f"slot freed {time.monotonic() - started:.2f} s after the client disconnected")


def test_drop_from_the_client_makes_the_host_leave(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    a, b, client = mesh
    unknown = subprocess.run(
        [sys.executable, "-m", "mesh_llm", "drop", "no-such-model", "--port", str(client.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert unknown.returncode == 1 and SMOLLM2.name in unknown.stderr, unknown
    done = subprocess.run(
        [sys.executable, "-m", "mesh_llm", "drop", GEMMA.name, "--port", str(client.port)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done
    assert b.wait_exit(30) == 0, b.log_text()
    wait_until(lambda: not warm(a, COPY) and not warm(client, COPY), 30, "gemma-3-270m cold")
    assert models_of(a)[COPY]["meta"]["state"] == "cold"
    assert _post(client, _chat_body(DEMO))[0] == 200  # the rest of the mesh is unaffected
    assert _post(client, _chat_body(GEMMA.name))[0] == 503  # cold: known by its model name


def test_killing_a_replica_host_mid_request_retries_on_the_other(
    tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path
) -> None:
    topology = Nodes(tmp_path, llama_binaries.llama_server.parent, demo_models_dir)
    try:
        first = topology.start("first", "--model", DEMO)
        token = token_of(first)
        second = topology.start("second", "--model", DEMO, "--join", token)
        front = topology.start("front", "--join", token)  # standby: routes, serves nothing
        first.wait_ready()
        second.wait_ready()
        wait_until(
            lambda: models_of(front).get(DEMO, {}).get("meta", {}).get("nodes") == 2,
            ROUTE_TIMEOUT_S,
            "two replicas in the front node's view",
        )
        # The front node's first request goes to the replica with the lower node id.
        victim = min((first, second), key=lambda n: n.node_id())
        survivor = second if victim is first else first
        request = urllib.request.Request(
            front.base_url + "/v1/chat/completions",
            data=_chat_body(DEMO, max_tokens=200, ignore_eos=True),
            headers={"Content-Type": "application/json"},
        )
        with _Background(request) as pending:
            wait_until(lambda: _slots_busy(victim) == 1, 20, "the victim generating")
            victim.signal(signal.SIGKILL)
            status, answer = pending.result(timeout_s=240)
        assert status == 200, answer
        assert answer["choices"][0]["message"]["content"]
        assert "retrying on another replica" in front.log_text()
        assert survivor.proc is not None and survivor.proc.poll() is None
    finally:
        topology.close()


class _Background:
    """One blocking HTTP request on a thread, so the test can act while it runs."""

    def __init__(self, request: urllib.request.Request) -> None:
        import threading

        self._request = request
        self._outcome: tuple[int, dict[str, Any]] | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with urllib.request.urlopen(self._request, timeout=180) as response:
                self._outcome = (response.status, json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            self._outcome = (exc.code, json.loads(exc.read()))

    def __enter__(self) -> _Background:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join(timeout=1)

    def result(self, timeout_s: float) -> tuple[int, dict[str, Any]]:
        self._thread.join(timeout=timeout_s)
        assert self._outcome is not None, "the request did not finish"
        return self._outcome
