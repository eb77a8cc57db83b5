"""The Anthropic Messages dialect of the API: its paths and its error shape (pure, no I/O).

`/v1/messages` and `/v1/messages/count_tokens` are routed like every other path (llama-server
speaks them natively), but every failure on them must look like Anthropic's
`{"type": "error", "error": {"type": …, "message": …}}` so Anthropic SDKs raise the right
exception. `anthropic_error(status, message)` builds that body; `translate_error(status, raw)`
turns any error body (OpenAI-shaped from this API or a peer, llama-server's own) into it;
`stream_error_event(message)` is the SSE `error` event that ends a broken stream.
"""

from __future__ import annotations

import json
from typing import Any

from mesh_llm.api.openai import COUNT_TOKENS_PATH, MESSAGES_PATH

ANTHROPIC_PATHS = frozenset({MESSAGES_PATH, COUNT_TOKENS_PATH})

# HTTP status → Anthropic error type (https://docs.anthropic.com/en/api/errors).
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "overloaded_error",
    504: "api_error",
    529: "overloaded_error",
}


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    """The Anthropic-shaped error body for an HTTP status."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def translate_error(status: int, raw: bytes) -> bytes:
    """Any error body (JSON or not) as an Anthropic-shaped one for `status`."""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        message = raw.decode("utf-8", "replace").strip() or f"HTTP {status}"
        return json.dumps(anthropic_error(status, message)).encode()
    if isinstance(document, dict) and document.get("type") == "error":
        return raw  # already Anthropic-shaped
    return json.dumps(anthropic_error(status, _message_of(document, status))).encode()


def _message_of(document: object, status: int) -> str:
    if isinstance(document, dict):
        error = document.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        if isinstance(document.get("message"), str):
            return str(document["message"])
    return f"HTTP {status}: {json.dumps(document)[:500]}"


def stream_error_event(message: str, status: int = 502) -> bytes:
    """The SSE event that ends an Anthropic stream broken mid-answer."""
    data = json.dumps(anthropic_error(status, message))
    return b"event: error\ndata: " + data.encode() + b"\n\n"
