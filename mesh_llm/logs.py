"""Logging set-up: pretty (rich) on a terminal, plain lines otherwise, JSON lines on request.

Every state change of note is logged with `extra={"event": name, ...fields}`; the JSON format
emits those fields, the pretty format shows the message. `-v` turns on DEBUG, which includes
the output of llama.cpp children. Lines logged while the API handles a request carry its
`request_id` (from the `REQUEST_ID` context variable, set by the API's request-id middleware).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from aiohttp.http_exceptions import HttpProcessingError
from rich.console import Console
from rich.logging import RichHandler

from mesh_llm.config import LogFormat

_STANDARD_ATTRS = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}
_NOISY_LIBRARIES = ("aiohttp.access", "asyncio", "quic", "filelock", "httpx", "huggingface_hub")

# The id of the API request being handled by the current task (None outside requests).
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdFilter(logging.Filter):
    """Adds `request_id` to records logged while a request is handled (JSON shows it as a field;
    the line formats append `[request_id]`)."""

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = REQUEST_ID.get()
        if request_id is not None and not hasattr(record, "request_id"):
            record.request_id = request_id
        return True


class BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (request line, header, chunked body) at ERROR with a
    traceback; one WARNING line with the client and the reason says all there is to say."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError):
            reason = " ".join(str(exc.message).split())[:200]
            record.msg = "bad HTTP request from %s: %s (answered %d)"
            args = record.args if isinstance(record.args, tuple) and record.args else ("?",)
            record.args = (args[0], reason, exc.code)
            record.exc_info = None
            record.exc_text = None
            if record.levelno > logging.WARNING:
                record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


BAD_REQUEST_FILTER = BadRequestFilter()
HTTP_SERVER_LOGGER = "aiohttp.server"


class _LineFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        request_id = getattr(record, "request_id", None)
        return f"{line} [{request_id}]" if request_id else line


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value if isinstance(value, str | int | float | bool) else str(value)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(log_format: LogFormat, verbose: int) -> None:
    """Install one handler on the root logger (idempotent)."""
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    handler: logging.Handler
    if log_format == "json":
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(JsonFormatter())
    elif sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_path=False, markup=False)
        handler.setFormatter(_LineFormatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(
            _LineFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
        )
    handler.addFilter(RequestIdFilter())
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
    server = logging.getLogger(HTTP_SERVER_LOGGER)
    if BAD_REQUEST_FILTER not in server.filters:
        server.addFilter(BAD_REQUEST_FILTER)
    for name in _NOISY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)


class RateLimitedLog:
    """One log line per event, at most `lines_per_s` a second: a flood (e.g. of refused
    connections) is logged as its first lines, then one line that counts the ones left out.

    The count of a window is logged with the first event after it (or by `flush()`), so a
    flood that stops leaves its tail summed up at the next event or when the owner closes.
    """

    def __init__(
        self,
        logger: logging.Logger,
        lines_per_s: int,
        what: str,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = logger
        self._lines_per_s = lines_per_s
        self._what = what  # "fast-lane connections refused or failed"
        self._clock = clock
        self._window_start = clock()
        self._lines = 0
        self._left_out = 0

    def log(self, level: int, message: str, *args: object, **extra: Any) -> None:
        now = self._clock()
        if now - self._window_start >= 1.0:
            self.flush()
            self._window_start, self._lines = now, 0
        if self._lines < self._lines_per_s:
            self._lines += 1
            self._log.log(level, message, *args, extra=extra or None)
        else:
            self._left_out += 1

    def flush(self) -> None:
        """Log how many events were left out since the last line about them (if any)."""
        if self._left_out:
            self._log.info(
                "%d more %s (not logged one by one)",
                self._left_out,
                self._what,
                extra={"event": "log_rate_limited", "left_out": self._left_out},
            )
            self._left_out = 0
