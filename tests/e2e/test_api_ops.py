"""End-to-end API operations with a real node, real llama-server and the real demo model:
the API key (from MESH_LLM_API_KEY, API on all interfaces), `/metrics` after real chats, and a
429 from a real second stream when the queue depth is 1."""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, http_status, wait_until
from tests.e2e.models import SMOLLM2
from tests.e2e.test_solo import DEMO_MODEL, PROMPT, open_long_stream

pytestmark = pytest.mark.e2e

KEY = "e2e-secret-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HTTP_TIMEOUT_S = 60
SLOT_FREE_TIMEOUT_S = 15.0
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def node(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[MeshProcess]:
    args = [
        "--model",
        SMOLLM2.catalog,
        "--models-dir",
        str(demo_models_dir),
        "--bin-dir",
        str(llama_binaries.llama_server.parent),
        "--log-format",
        "json",
        "--listen-all",
        "--queue-depth",
        "1",
    ]
    home = tmp_path_factory.mktemp("apiops")
    process = MeshProcess(home, args, env={"MESH_LLM_API_KEY": KEY}).start()
    try:
        process.wait_ready()  # /readyz answers without the key
        yield process
    finally:
        process.stop()


def _request(
    node: MeshProcess, method: str, path: str, body: object = None, **headers: str
) -> tuple[int, dict[str, str], bytes]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        node.base_url + path,
        data=data,
        headers={"Content-Type": "application/json", **headers},
        method=method,
    )
    try:
        with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def _samples(node: MeshProcess) -> Samples:
    status, _, body = _request(node, "GET", "/metrics", **AUTH)
    assert status == 200
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_key_is_enforced_and_probes_stay_open(node: MeshProcess) -> None:
    assert "WITHOUT an API key" not in node.log_text()
    assert http_status(node.base_url + "/healthz") == 200
    assert http_status(node.base_url + "/readyz") == 200
    chat = {"model": DEMO_MODEL, "messages": PROMPT, "max_tokens": 4}
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        status, response_headers, body = _request(
            node, "POST", "/v1/chat/completions", chat, **headers
        )
        assert status == 401
        assert response_headers["WWW-Authenticate"].startswith("Bearer")
        assert json.loads(body)["error"]["type"] == "authentication_error"
    assert _request(node, "GET", "/metrics")[0] == 401
    assert _request(node, "GET", "/v1/models")[0] == 401

    wrong = openai.OpenAI(base_url=node.base_url + "/v1", api_key="wrong", max_retries=0)
    with wrong, pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with openai.OpenAI(base_url=node.base_url + "/v1", api_key=KEY, max_retries=0) as client:
        reply = client.chat.completions.create(model=DEMO_MODEL, messages=PROMPT, max_tokens=8)
        assert reply.choices[0].message.content


def test_metrics_count_a_real_chat(node: MeshProcess) -> None:
    before = _samples(node)
    ok = {"route": "local", "status": "200"}
    chat = {"model": DEMO_MODEL, "messages": PROMPT, "max_tokens": 8}
    status, headers, body = _request(
        node, "POST", "/v1/chat/completions", chat, **AUTH, **{"X-Request-Id": "e2e-metrics-1"}
    )
    assert status == 200
    assert headers["X-Request-Id"] == "e2e-metrics-1"
    usage = json.loads(body)["usage"]["completion_tokens"]
    assert usage > 0
    after = _samples(node)
    models = {
        dict(labels)["model"]
        for name, labels in after
        if name == "mesh_llm_requests_total" and dict(labels).get("route") == "local"
    }
    assert len(models) == 1, models
    [model] = models
    assert (
        _value(after, "mesh_llm_requests_total", model=model, **ok)
        == _value(before, "mesh_llm_requests_total", model=model, **ok) + 1
    )
    assert (
        _value(after, "mesh_llm_tokens_generated_total", model=model)
        - _value(before, "mesh_llm_tokens_generated_total", model=model)
        == usage
    )
    assert (
        _value(after, "mesh_llm_time_to_first_byte_seconds_count", model=model, route="local") >= 1
    )
    assert _value(after, "mesh_llm_backend_state", model=model, state="ready") == 1
    assert _value(after, "mesh_llm_queue_capacity") == 1
    assert ("mesh_llm_peers", frozenset()) in after


def _open_stream(node: MeshProcess) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    return open_long_stream(node.port, AUTH, HTTP_TIMEOUT_S)


def test_second_stream_is_429_when_the_queue_depth_is_1(node: MeshProcess) -> None:
    first, response = _open_stream(node)
    try:
        assert response.status == 200
        line = response.readline()
        while not line.startswith(b"data: "):
            assert line, "the first stream ended early"
            line = response.readline()
        second, refused = _open_stream(node)
        try:
            assert refused.status == 429
            assert refused.getheader("Retry-After") == "1"
            error = json.loads(refused.read())["error"]
        finally:
            second.close()
        assert error["type"] == "rate_limit_error"
        assert error["code"] == "queue_full"
    finally:
        first.close()  # the client goes away: its slot frees

    chat = {"model": DEMO_MODEL, "messages": PROMPT, "max_tokens": 4}
    wait_until(
        lambda: _request(node, "POST", "/v1/chat/completions", chat, **AUTH)[0] == 200,
        SLOT_FREE_TIMEOUT_S,
        "the slot of the closed stream to free",
    )
    samples = _samples(node)
    refusals = [
        v
        for (name, labels), v in samples.items()
        if name == "mesh_llm_requests_total" and dict(labels).get("status") == "429"
    ]
    assert refusals == [1.0]
