"""End-to-end: one real `mesh-llm` node serving the real demo model with real llama-server.

These are the walking-skeleton promises: 503 while loading, OpenAI chat (plain and streaming)
through the official client, errors in OpenAI shape, a client disconnect freeing the llama.cpp
slot, Ctrl-C stopping everything with exit 0, and `kill -9` of the node leaving no llama-server.
"""

from __future__ import annotations

import http.client
import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from openai import OpenAI
from openai.types.chat import ChatCompletionMessageParam

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, http_status, wait_until
from tests.e2e.models import SMOLLM2

pytestmark = pytest.mark.e2e

DEMO_MODEL = SMOLLM2.name
PROMPT: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write one sentence about the sea."}
]


def _node(home: Path, binaries: Binaries, models_dir: Path) -> MeshProcess:
    args = [
        "--model",
        SMOLLM2.catalog,
        "--models-dir",
        str(models_dir),
        "--bin-dir",
        str(binaries.llama_server.parent),
        "--log-format",
        "json",
    ]
    return MeshProcess(home, args)


@pytest.fixture(scope="module")
def solo(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[MeshProcess]:
    node = _node(tmp_path_factory.mktemp("solo"), llama_binaries, demo_models_dir).start()
    try:
        node.wait_ready()
        yield node
    finally:
        node.stop()


def _post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict]:  # type: ignore[type-arg]
    request = urllib.request.Request(
        url, data=body, headers={"Content-Type": content_type}, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_chat_with_official_client(solo: MeshProcess) -> None:
    with OpenAI(base_url=solo.base_url + "/v1", api_key="unused") as client:
        reply = client.chat.completions.create(model=DEMO_MODEL, messages=PROMPT, max_tokens=24)
        text = reply.choices[0].message.content
        assert text is not None and text.strip(), reply
        assert reply.usage is not None and reply.usage.completion_tokens > 0


def test_the_demo_model_answers_and_stops(solo: MeshProcess) -> None:
    """The default demo model is an instruct model: a short, right answer that ends by itself."""
    question: list[ChatCompletionMessageParam] = [  # README's first request
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
    ]
    with OpenAI(base_url=solo.base_url + "/v1", api_key="unused", max_retries=0) as client:
        reply = client.chat.completions.create(
            model=SMOLLM2.catalog, messages=question, max_tokens=200, temperature=0
        )
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", reply
    assert "Paris" in (choice.message.content or ""), reply
    assert reply.usage is not None and reply.usage.completion_tokens < 30, reply.usage


def test_streaming_chat_with_official_client(solo: MeshProcess) -> None:
    with OpenAI(base_url=solo.base_url + "/v1", api_key="unused") as client:
        stream = client.chat.completions.create(
            model=DEMO_MODEL,
            messages=PROMPT,
            max_tokens=24,
            stream=True,
        )
        pieces = [chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices]
        assert len(pieces) > 3
        assert "".join(pieces).strip()


def test_raw_sse_ends_with_done(solo: MeshProcess) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", solo.port, timeout=60)
    body = {"model": DEMO_MODEL, "messages": PROMPT, "max_tokens": 8, "stream": True}
    connection.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = connection.getresponse()
    assert response.status == 200
    assert response.getheader("Content-Type", "").startswith("text/event-stream")
    events = [line for line in response.read().decode().splitlines() if line.startswith("data: ")]
    connection.close()
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_models_and_errors(solo: MeshProcess) -> None:
    with urllib.request.urlopen(solo.base_url + "/v1/models", timeout=10) as response:
        models = json.loads(response.read())
    assert [m["id"] for m in models["data"]] == [DEMO_MODEL]
    assert models["data"][0]["meta"]["state"] == "warm"

    status, body = _post(solo.base_url + "/v1/chat/completions", b"{not json")
    assert status == 400 and body["error"]["type"] == "invalid_request_error"

    unknown = json.dumps({"model": "nope", "messages": PROMPT}).encode()
    status, body = _post(solo.base_url + "/v1/chat/completions", unknown)
    assert status == 404 and DEMO_MODEL in body["error"]["message"]

    # The catalog name is an alias of the served file's model name.
    alias = json.dumps({"model": SMOLLM2.catalog, "messages": PROMPT, "max_tokens": 4}).encode()
    status, body = _post(solo.base_url + "/v1/chat/completions", alias)
    assert status == 200 and body["choices"][0]["message"]["content"] is not None
    assert http_status(solo.base_url + "/healthz") == 200


def _llama_metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        for line in response.read().decode().splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    raise AssertionError(f"metric {name} not found")


def open_long_stream(
    port: int, headers: dict[str, str] | None = None, timeout_s: float = 60
) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    """A streaming chat of 2000 tokens (it runs until the client goes away), head received."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    body = {
        "model": DEMO_MODEL,
        "messages": PROMPT,
        "max_tokens": 2000,
        "stream": True,
        "ignore_eos": True,
    }
    connection.request(
        "POST",
        "/v1/chat/completions",
        json.dumps(body),
        {"Content-Type": "application/json", **(headers or {})},
    )
    return connection, connection.getresponse()


def test_client_disconnect_frees_the_slot(solo: MeshProcess) -> None:
    port = solo.llama_server_port()
    connection, response = open_long_stream(solo.port)
    assert response.status == 200
    events = 0
    while events < 3:  # a few generated chunks: generation is under way
        line = response.readline()
        assert line, "stream ended early"
        events += line.startswith(b"data: ")
    assert _llama_metric(port, "llamacpp:requests_processing") == 1
    connection.close()  # the client goes away mid-generation
    wait_until(
        lambda: _llama_metric(port, "llamacpp:requests_processing") == 0,
        10,
        "llama-server to drop the abandoned request",
    )


def _slow_start_bin_dir(tmp_path: Path, binaries: Binaries) -> Path:
    """A bin dir whose llama-server waits before exec'ing the real one: a long model load."""
    bin_dir = tmp_path / "slow-bin"
    bin_dir.mkdir()
    script = bin_dir / "llama-server"
    script.write_text(f'#!/bin/sh\nsleep 3\nexec "{binaries.llama_server}" "$@"\n')
    script.chmod(0o755)
    return bin_dir


def test_503_while_loading_then_ctrl_c_stops_everything(
    tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path
) -> None:
    node = _node(tmp_path, llama_binaries, demo_models_dir)
    node.args[node.args.index("--bin-dir") + 1] = str(_slow_start_bin_dir(tmp_path, llama_binaries))
    node.start()
    try:
        wait_until(lambda: http_status(node.base_url + "/healthz") == 200, 30, "API up")
        chat = json.dumps({"model": DEMO_MODEL, "messages": PROMPT}).encode()
        request = urllib.request.Request(
            node.base_url + "/v1/chat/completions",
            data=chat,
            headers={"Content-Type": "application/json"},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        assert refused.value.code == 503
        assert refused.value.headers["Retry-After"] == "5"
        body = json.loads(refused.value.read())
        assert body["error"]["code"] == "model_not_ready"
        assert "not ready" in body["error"]["message"]
        assert http_status(node.base_url + "/readyz") == 503
        node.wait_ready()
        server = node.llama_server()
        node.signal(signal.SIGINT)
        assert node.wait_exit() == 0
        wait_until(lambda: not server.is_running(), 5, "llama-server to exit")
        assert node.descendants() == []
    finally:
        node.stop()


def test_kill_9_of_node_leaves_no_llama_server(
    tmp_path: Path, llama_binaries: Binaries, demo_models_dir: Path
) -> None:
    node = _node(tmp_path, llama_binaries, demo_models_dir).start()
    try:
        node.wait_ready()
        server = node.llama_server()
        node.signal(signal.SIGKILL)
        node.wait_exit()

        def gone() -> bool:
            try:
                return server.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_until(gone, 5, f"llama-server pid {server.pid} to die with its node")
    finally:
        node.stop()
