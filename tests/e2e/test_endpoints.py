"""End-to-end: every API a client speaks, from a `--client` node, to models on two hosts.

Topology (module scope): host A serves gemma-3-270m with embeddings enabled
(`--embeddings`, mean pooling); host B joins and serves SmolLM2-135M (chat only), a different
real model (tests/e2e/models.py); C is a
passive `--client` with an API key. From C: the official `openai` SDK (chat, streaming chat,
`responses.create`, embeddings) and the official `anthropic` SDK (`messages.create` plain and
streaming, `count_tokens`) reach both hosts; `/tokenize` reaches the host serving the model it
names; embeddings to a chat-only model and `/v1/rerank` (no reranker in the mesh) are clear
400s; `/v1/messages` answers Anthropic-shaped 401 and 404. Real processes, real llama-server,
both real models (gemma is a base model: every generation is capped with `max_tokens`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import anthropic
import openai
import pytest

from mesh_llm.backend.build import Binaries
from tests.e2e.harness import MeshProcess, wait_until
from tests.e2e.models import GEMMA, SMOLLM2

pytestmark = pytest.mark.e2e

# The models of this test, in one place: catalog names (API aliases) and served names.
EMBEDDING_HOST_MODEL = GEMMA.catalog  # host A, served with --embeddings
CHAT_ONLY_MODEL = SMOLLM2.catalog  # host B: the second, different real model
CHAT_ONLY_NAME = SMOLLM2.name  # what /v1/models and error messages call it
EMBEDDING_LENGTH = 640  # gemma-3-270m's embedding_length
API_KEY = "e2e-endpoints-key"
MAX_TOKENS = 8
ROUTE_TIMEOUT_S = 60.0


def _models(node: MeshProcess) -> dict[str, dict[str, Any]]:
    request = urllib.request.Request(
        node.base_url + "/v1/models", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        data = json.loads(response.read())["data"]
    return {name: m for m in data for name in (m["id"], *m["meta"]["aliases"])}


def _warm(node: MeshProcess, *names: str) -> bool:
    try:
        found = _models(node)
    except OSError:
        return False
    return all(found.get(n, {}).get("meta", {}).get("state") == "warm" for n in names)


def _post(
    node: MeshProcess, path: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        node.base_url + path,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def _peer_requests(node: MeshProcess, model: str) -> float:
    """What `node` answered other nodes for `model` with 200 (its /metrics)."""
    request = urllib.request.Request(
        node.base_url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        lines = response.read().decode().splitlines()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in lines
        if line.startswith("mesh_llm_peer_requests_total{")
        and f'model="{model}"' in line
        and 'status="200"' in line
    )


@pytest.fixture(scope="module")
def mesh(
    tmp_path_factory: pytest.TempPathFactory, llama_binaries: Binaries, demo_models_dir: Path
) -> Iterator[tuple[MeshProcess, MeshProcess, MeshProcess]]:
    root = tmp_path_factory.mktemp("endpoints")
    bin_dir = str(llama_binaries.llama_server.parent)
    nodes: list[MeshProcess] = []

    def start(name: str, models_dir: Path, *args: str) -> MeshProcess:
        home = root / name
        home.mkdir()
        (home / "config.toml").write_text(f'[api]\napi_key = "{API_KEY}"\n')
        common = ["--models-dir", str(models_dir), "--bin-dir", bin_dir, "--log-format", "json"]
        node = MeshProcess(home, [*args, *common])
        nodes.append(node.start())
        return node

    try:
        a = start(
            "a",
            demo_models_dir,
            "--model",
            EMBEDDING_HOST_MODEL,
            "--embeddings",
            EMBEDDING_HOST_MODEL,
        )
        wait_until(lambda: bool(a.status().get("token")), 30, "invite token")
        token = a.status()["token"]
        b = start("b", demo_models_dir, "--model", CHAT_ONLY_MODEL, "--join", token)
        c = start("c", demo_models_dir, "--client", "--join", token)
        a.wait_ready()
        b.wait_ready()
        both = (EMBEDDING_HOST_MODEL, CHAT_ONLY_MODEL)
        wait_until(partial(_warm, c, *both), ROUTE_TIMEOUT_S, "both models warm on the client")
        yield a, b, c
    finally:
        for node in nodes:
            node.stop()


def test_llama_server_flags_follow_the_capabilities(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    a, b, c = mesh
    argv_a, argv_b = a.llama_argv(), b.llama_argv()
    assert argv_a[argv_a.index("--embeddings") + 1 :][:2] == ["--pooling", "mean"]
    assert "--embeddings" not in argv_b
    listed = _models(c)
    assert listed[EMBEDDING_HOST_MODEL]["capabilities"] == ["chat", "completion", "embeddings"]
    assert listed[CHAT_ONLY_MODEL]["capabilities"] == ["chat", "completion"]


def test_openai_sdk_reaches_both_hosts(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    client_node = mesh[2]
    messages: Any = [{"role": "user", "content": "Say hello."}]
    with openai.OpenAI(
        base_url=client_node.base_url + "/v1", api_key=API_KEY, max_retries=0
    ) as client:
        for model in (EMBEDDING_HOST_MODEL, CHAT_ONLY_MODEL):
            answer = client.chat.completions.create(
                model=model, messages=messages, max_tokens=MAX_TOKENS
            )
            assert answer.choices[0].message.content, model
            pieces = [
                chunk.choices[0].delta.content or ""
                for chunk in client.chat.completions.create(
                    model=model, messages=messages, max_tokens=MAX_TOKENS, stream=True
                )
                if chunk.choices
            ]
            assert len(pieces) >= 2 and "".join(pieces), (model, pieces)
            response = client.responses.create(
                model=model, input="Say hello.", max_output_tokens=MAX_TOKENS
            )
            assert response.status == "completed", response
            assert response.output_text, model
        embedded = client.embeddings.create(model=EMBEDDING_HOST_MODEL, input=["hello", "mesh"])
        vectors = [item.embedding for item in embedded.data]
        assert [len(v) for v in vectors] == [EMBEDDING_LENGTH] * 2
        assert vectors[0] != vectors[1] and any(x != 0 for x in vectors[0])
        with pytest.raises(openai.BadRequestError) as refused:
            client.embeddings.create(model=CHAT_ONLY_MODEL, input="hello")
        message = str(refused.value)
        assert f"{CHAT_ONLY_NAME} cannot answer embeddings" in message
        assert f"models that can: {GEMMA.name}" in message


def test_anthropic_sdk_reaches_both_hosts(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    client_node = mesh[2]
    client = anthropic.Anthropic(base_url=client_node.base_url, api_key=API_KEY, max_retries=0)
    try:
        for model in (EMBEDDING_HOST_MODEL, CHAT_ONLY_MODEL):
            message = client.messages.create(
                model=model,
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Say hello."}],
            )
            assert message.type == "message" and message.content, model
            assert message.usage.output_tokens > 0
            with client.messages.stream(
                model=model,
                max_tokens=MAX_TOKENS,
                messages=[{"role": "user", "content": "Count to five."}],
            ) as stream:
                pieces = list(stream.text_stream)
            assert len(pieces) >= 2 and "".join(pieces), (model, pieces)
            counted = client.messages.count_tokens(
                model=model, messages=[{"role": "user", "content": "Say hello."}]
            )
            assert counted.input_tokens > 0
    finally:
        client.close()


def test_tokenize_reaches_the_host_of_its_model(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    a, b, c = mesh
    auth = {"Authorization": f"Bearer {API_KEY}"}
    listed = _models(c)  # metrics carry the model's name (its file stem), not the alias
    name_a, name_b = (listed[m]["id"] for m in (EMBEDDING_HOST_MODEL, CHAT_ONLY_MODEL))
    before_a, before_b = _peer_requests(a, name_a), _peer_requests(b, name_b)
    for model in (EMBEDDING_HOST_MODEL, CHAT_ONLY_MODEL):
        status, body = _post(c, "/tokenize", {"model": model, "content": "hello mesh"}, auth)
        assert status == 200, body
        assert body["tokens"] and all(isinstance(t, int) for t in body["tokens"])
        status, back = _post(c, "/detokenize", {"model": model, "tokens": body["tokens"]}, auth)
        assert status == 200 and "hello mesh" in back["content"], back
    assert _peer_requests(a, name_a) == before_a + 2
    assert _peer_requests(b, name_b) == before_b + 2
    status, body = _post(c, "/tokenize", {"model": "no-such-model", "content": "x"}, auth)
    assert status == 404 and "no-such-model" in body["error"]["message"]


def test_rerank_without_a_reranker_is_a_clear_400(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    auth = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": CHAT_ONLY_MODEL, "query": "q", "documents": ["a", "b"]}
    status, answer = _post(mesh[2], "/v1/rerank", body, auth)
    assert status == 400, answer
    assert "cannot answer rerank" in answer["error"]["message"]
    assert "reranker" in answer["error"]["message"]


def test_anthropic_shaped_401_and_404(
    mesh: tuple[MeshProcess, MeshProcess, MeshProcess],
) -> None:
    client_node = mesh[2]
    body = {
        "model": CHAT_ONLY_MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": "hi"}],
    }
    status, answer = _post(client_node, "/v1/messages", body)
    assert status == 401
    assert answer["type"] == "error" and answer["error"]["type"] == "authentication_error"
    status, answer = _post(client_node, "/v1/messages", body, {"x-api-key": "wrong"})
    assert (status, answer["error"]["type"]) == (401, "authentication_error")
    status, answer = _post(
        client_node, "/v1/messages", {**body, "model": "no-such-model"}, {"x-api-key": API_KEY}
    )
    assert status == 404
    assert answer["type"] == "error" and answer["error"]["type"] == "not_found_error"
    assert "no-such-model" in answer["error"]["message"]
    client = anthropic.Anthropic(base_url=client_node.base_url, api_key="wrong", max_retries=0)
    try:
        with pytest.raises(anthropic.AuthenticationError):
            client.messages.create(
                model=CHAT_ONLY_MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
    finally:
        client.close()
