"""A fake Hugging Face Hub file server on 127.0.0.1 for download tests.

It serves `/{org}/{repo}/resolve/{revision}/{filename}` (and any other registered path) the way
the Hub does for GGUF files: HEAD and GET with `ETag`, `X-Repo-Commit`, `Content-Length`,
`Accept-Ranges`, and `Range: bytes=N-` answered with 206 and `Content-Range`. It records every
request, and can cut the body of the next GET after some bytes (to test resume) or ignore
`Range` (to test servers that always send the whole file). Runs `http.server` in a thread; use it
as a context manager so it is always stopped.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType

COMMIT = "0123456789abcdef0123456789abcdef01234567"
_RANGE_RE = re.compile(r"bytes=(\d+)-$")


@dataclass(frozen=True, slots=True)
class SeenRequest:
    method: str
    path: str
    headers: dict[str, str]


@dataclass(slots=True)
class _State:
    files: dict[str, bytes] = field(default_factory=dict)
    requests: list[SeenRequest] = field(default_factory=list)
    cut_next_get_after: int | None = None
    ignore_range: bool = False
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeHub:
    """`with FakeHub() as hub: hub.add_file("org/repo", "x.gguf", data); hub.endpoint`."""

    def __init__(self) -> None:
        self._state = _State()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_class(self._state))
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def add_file(self, repo: str, filename: str, data: bytes, revision: str = "main") -> str:
        """Serve `data` as `filename` of `repo`; returns the URL path."""
        return self.add_path(f"/{repo}/resolve/{revision}/{filename}", data)

    def add_path(self, path: str, data: bytes) -> str:
        with self._state.lock:
            self._state.files[path] = data
        return path

    def cut_next_get_after(self, size_bytes: int) -> None:
        """The next GET announces the full length but sends only `size_bytes` then closes."""
        self._state.cut_next_get_after = size_bytes

    def ignore_range(self, ignore: bool = True) -> None:
        self._state.ignore_range = ignore

    @property
    def requests(self) -> list[SeenRequest]:
        with self._state.lock:
            return list(self._state.requests)

    def gets(self) -> list[SeenRequest]:
        return [r for r in self.requests if r.method == "GET"]

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)


def _handler_class(state: _State) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:
            """Silence the default stderr access log."""

        def do_HEAD(self) -> None:
            self._serve(send_body=False)

        def do_GET(self) -> None:
            self._serve(send_body=True)

        def _serve(self, *, send_body: bool) -> None:
            with state.lock:
                state.requests.append(SeenRequest(self.command, self.path, dict(self.headers)))
                data = state.files.get(self.path)
                cut = state.cut_next_get_after if send_body else None
                if send_body:
                    state.cut_next_get_after = None
            if data is None:
                self._send_status(404, {"X-Error-Code": "EntryNotFound"})
                return
            start = self._range_start(len(data))
            if start is None:
                return
            body = data[start:]
            headers = {
                "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
                "X-Repo-Commit": COMMIT,
                "Accept-Ranges": "bytes",
                "Content-Length": str(len(body)),
                "Content-Type": "application/octet-stream",
            }
            if start:
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self._send_headers(206 if start else 200, headers)
            if send_body:
                self.wfile.write(body if cut is None else body[:cut])
                if cut is not None:
                    self.close_connection = True

        def _range_start(self, size: int) -> int | None:
            """The first byte to send, or None after answering 416 to a bad range."""
            header = self.headers.get("Range")
            if header is None or state.ignore_range:
                return 0
            match = _RANGE_RE.match(header)
            if match is None or int(match[1]) >= size:
                self._send_status(416, {"Content-Range": f"bytes */{size}"})
                return None
            return int(match[1])

        def _send_status(self, status: int, headers: dict[str, str]) -> None:
            self._send_headers(status, {**headers, "Content-Length": "0"})

        def _send_headers(self, status: int, headers: dict[str, str]) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()

    return Handler
