"""Hostile and broken clients against the node's API, served the way the node serves it.

The API app (over a fake llama-server that serves one ready model) runs with the node's head
limits on a thread of its own, so hypothesis can throw raw HTTP requests at it from the test:
random methods, paths, headers, bodies (JSON or not) and sizes. Whatever comes in: never a 500,
never a dead server, and every error is OpenAI-shaped JSON. A malformed request line, header or
chunked body gets 400 and one WARNING line (not aiohttp's ERROR traceback); a client that sends
its body too slowly gets 408 after `body_read_timeout_s` instead of holding its handler forever,
and one that never finishes its head is closed after `head_and_idle_timeout_s`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mesh_llm.api.app import create_app
from mesh_llm.api.operations import http_limits
from mesh_llm.config import ApiConfig
from mesh_llm.core.router import ModelState, ModelStatus
from mesh_llm.core.types import ModelName
from mesh_llm.logs import BAD_REQUEST_FILTER, HTTP_SERVER_LOGGER
from tests.fakes.fake_llama import MODEL_ID, FakeLlama, serve

BODY_TIMEOUT_S = 1.0
HEAD_TIMEOUT_S = 2.0
CONFIG = ApiConfig(
    port=0,
    max_body_bytes=256 * 1024,
    first_byte_timeout_s=5.0,
    idle_chunk_timeout_s=5.0,
    body_read_timeout_s=BODY_TIMEOUT_S,
    head_and_idle_timeout_s=HEAD_TIMEOUT_S,
)
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/v1/",
    "/v1/chat/completions/../../etc/passwd",
]


class Directory:
    def __init__(self, statuses: list[ModelStatus]) -> None:
        self.statuses = statuses

    def model_statuses(self) -> list[ModelStatus]:
        return self.statuses


class ApiThread:
    """The API and a fake llama-server on one event loop in a thread of their own."""

    def __init__(self) -> None:
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        async with AsyncExitStack() as stack:
            fake = FakeLlama(healthy=True)
            fake_url = await stack.enter_async_context(serve(fake.app()))
            ready = ModelStatus(ModelName(MODEL_ID), ModelState.READY, endpoint=fake_url)
            loading = ModelStatus(ModelName("loading-model"), ModelState.LOADING, "loading")
            app = create_app(Directory([ready, loading]), CONFIG)
            url = await stack.enter_async_context(serve(app, **http_limits(CONFIG)))
            self.port = int(url.rsplit(":", 1)[1])
            self._ready.set()
            await self._stop.wait()

    def __enter__(self) -> ApiThread:
        self._thread.start()
        assert self._ready.wait(10), "the API did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)


@pytest.fixture(scope="module")
def api() -> Iterator[ApiThread]:
    with ApiThread() as running:
        yield running


def exchange(port: int, raw: bytes, timeout_s: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send `raw` bytes, read the whole answer (the server closes, or Content-Length says)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(raw)  # no half-close: aiohttp takes EOF as the client leaving
        data = b""
        while True:
            try:
                piece = sock.recv(65536)
            except TimeoutError:
                break
            if not piece:
                break
            data += piece
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1."), data[:200]
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, body


def _assert_openai_error(status: int, headers: dict[str, str], body: bytes) -> None:
    assert headers.get("content-type", "").startswith("application/json"), (status, body[:200])
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error


_token = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=20)
_header_value = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200
).map(str.strip)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=50),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=20,
)
_chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from([MODEL_ID, "loading-model", "nope", ""]) | _json,
        "messages": st.just([{"role": "user", "content": "hi"}]) | _json,
        "stream": _json,
        "max_tokens": _json,
        "prompt": _json,
        "input": _json,
    },
)
_body = st.one_of(
    _json.map(lambda v: json.dumps(v).encode()),
    _chat_like.map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=2000),
    st.text(max_size=500).map(lambda t: t.encode("utf-16")),
    st.integers(0, 300_000).map(lambda n: b'{"model": "' + b"a" * n + b'"}'),
)


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(
        ["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "PROPFIND"]
    ),
    path=st.sampled_from(PATHS) | _token.map(lambda t: f"/v1/{t}"),
    query=st.none() | _token,
    headers=st.dictionaries(_token, _header_value, max_size=6),
    content_type=st.sampled_from(
        ["application/json", "text/plain", "application/json; charset=latin-1", ""]
    ),
    body=_body,
)
def test_random_requests_never_get_a_500_and_errors_are_openai_shaped(
    api: ApiThread,
    method: str,
    path: str,
    query: str | None,
    headers: dict[str, str],
    content_type: str,
    body: bytes,
) -> None:
    target = path + (f"?{query}" if query else "")
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1", "Connection: close"]
    skip = {"host", "connection", "content-length", "transfer-encoding", "content-type", "expect"}
    lines += [f"{name}: {value}" for name, value in headers.items() if name not in skip]
    if content_type:
        lines.append(f"Content-Type: {content_type}")
    lines.append(f"Content-Length: {len(body)}")
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    status, answer_headers, answer = exchange(api.port, raw)
    assert status < 500 or status == 503, (status, answer[:300])
    if status >= 400 and method != "HEAD":
        _assert_openai_error(status, answer_headers, answer)


def test_the_server_survives_the_barrage(api: ApiThread) -> None:
    status, _, body = exchange(api.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", 5)
    assert status == 200 and json.loads(body) == {"status": "ok"}


@pytest.fixture
def one_line_logs() -> Iterator[None]:
    """The node's log set-up for aiohttp's server logger (`setup_logging` installs it)."""
    logger = logging.getLogger(HTTP_SERVER_LOGGER)
    logger.addFilter(BAD_REQUEST_FILTER)
    try:
        yield
    finally:
        logger.removeFilter(BAD_REQUEST_FILTER)


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
        b"GET /v1/models HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"zz\r\nabc\r\n0\r\n\r\n",
        b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 10_000 + b"\r\n\r\n",
    ],
    ids=["request-line", "header", "version", "chunked", "long-line", "long-header"],
)
def test_a_malformed_request_gets_400_and_one_log_line(
    api: ApiThread, one_line_logs: None, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    caplog.set_level(logging.DEBUG, logger=HTTP_SERVER_LOGGER)
    status, _, _ = exchange(api.port, raw)
    assert status in (400, 431, 414), status
    deadline = time.monotonic() + 5
    while not caplog.records and time.monotonic() < deadline:
        time.sleep(0.05)
    records = [r for r in caplog.records if r.name == HTTP_SERVER_LOGGER]
    assert len(records) == 1, [r.getMessage() for r in records]
    [record] = records
    assert record.levelno <= logging.WARNING and record.exc_info is None
    line = record.getMessage()
    assert "\n" not in line and line.startswith("bad HTTP request from 127.0.0.1: "), line


def test_a_slow_body_is_cut_off_with_408(api: ApiThread) -> None:
    """Slowloris on the body: the head arrives, the body trickles, then stops."""
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", api.port), timeout=BODY_TIMEOUT_S + 10) as sock:
        sock.sendall(head + b'{"model": ')
        data = sock.recv(65536)  # the answer comes without the rest of the body
        elapsed = time.monotonic() - started
        while piece := sock.recv(65536):  # then aiohttp lingers (≤ 10 s) and closes
            data += piece
    assert data.startswith(b"HTTP/1.1 408"), data[:200]
    body: dict[str, Any] = json.loads(data.partition(b"\r\n\r\n")[2])
    assert body["error"]["code"] == "body_timeout"
    assert BODY_TIMEOUT_S - 0.1 <= elapsed < BODY_TIMEOUT_S + 5, elapsed


def test_a_slow_head_is_cut_off(api: ApiThread) -> None:
    """Slowloris on the head: a header byte every 0.3 s never completes the request; the
    connection is closed after `head_and_idle_timeout_s` however long the trickle goes on."""
    started = time.monotonic()
    closed_after = None
    with socket.create_connection(("127.0.0.1", api.port), timeout=1) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        while time.monotonic() - started < HEAD_TIMEOUT_S + 8:
            try:
                sock.sendall(b"a")
                readable, _, _ = select.select([sock], [], [], 0.3)
                if readable and sock.recv(1024) == b"":
                    closed_after = time.monotonic() - started
                    break
            except (ConnectionResetError, BrokenPipeError):  # reset by the server
                closed_after = time.monotonic() - started
                break
    assert closed_after is not None, "the server kept the slow connection open"
    assert HEAD_TIMEOUT_S - 0.1 <= closed_after < HEAD_TIMEOUT_S + 3, closed_after
