"""Cheap counting of generated tokens in OpenAI responses as they stream through the proxy.

What is counted (documented in README, `mesh_llm_tokens_generated_total`):
- SSE streams (`text/event-stream`): one token per `data:` event whose `content`, `text` or
  `reasoning_content` field is a non-empty string. llama-server sends one event per generated
  token, so this is the token count up to the odd merged event (e.g. a split UTF-8 character).
  Events are found by splitting on newlines and checked with one regex — no JSON parsing.
- JSON responses: `usage.completion_tokens` when the body (kept only up to
  `JSON_BODY_MAX_BYTES`) has it; embeddings and bodies without usage count 0.
Pure: no I/O, no clock.
"""

from __future__ import annotations

import re
from typing import Protocol

SSE_LINE_MAX_BYTES = 1024 * 1024  # a longer partial line is dropped, not buffered
JSON_BODY_MAX_BYTES = 1024 * 1024  # a longer JSON body is relayed but its tokens not counted
_CONTENT = re.compile(rb'"(?:reasoning_content|content|text)"\s*:\s*"(?!")')
_COMPLETION_TOKENS = re.compile(rb'"completion_tokens"\s*:\s*(\d+)')
_DATA = b"data:"


class TokenCounter(Protocol):
    def feed(self, chunk: bytes) -> int:
        """Tokens found in this chunk of the response body (as far as known now)."""

    def finish(self) -> int:
        """Tokens found once the body is complete (not counted by `feed` before)."""


class SseTokenCounter:
    """Counts SSE events carrying generated text, across arbitrary chunk boundaries."""

    def __init__(self) -> None:
        self._partial = b""

    def feed(self, chunk: bytes) -> int:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > SSE_LINE_MAX_BYTES:
            self._partial = b""
        return sum(1 for line in lines if _carries_text(line))

    def finish(self) -> int:
        partial, self._partial = self._partial, b""
        return 1 if _carries_text(partial) else 0


def _carries_text(line: bytes) -> bool:
    return line.startswith(_DATA) and _CONTENT.search(line) is not None


class JsonUsageCounter:
    """Reads `usage.completion_tokens` from a whole (bounded) JSON body at the end."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._size = 0

    def feed(self, chunk: bytes) -> int:
        self._size += len(chunk)
        if self._size <= JSON_BODY_MAX_BYTES:
            self._parts.append(chunk)
        else:
            self._parts.clear()
        return 0

    def finish(self) -> int:
        if self._size > JSON_BODY_MAX_BYTES:
            return 0
        # The last match: `usage` follows the choices, whose text could quote the key.
        matches = _COMPLETION_TOKENS.findall(b"".join(self._parts))
        self._parts.clear()
        return int(matches[-1]) if matches else 0


class NoTokenCounter:
    """For responses that carry no generated text (errors, other content types)."""

    def feed(self, chunk: bytes) -> int:
        return 0

    def finish(self) -> int:
        return 0


def counter_for(content_type: str) -> TokenCounter:
    """The counter for a response of this `Content-Type`."""
    media = content_type.split(";", 1)[0].strip().lower()
    if media == "text/event-stream":
        return SseTokenCounter()
    if media == "application/json":
        return JsonUsageCounter()
    return NoTokenCounter()
