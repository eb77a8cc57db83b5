"""OpenAI wire shapes: request validation and error bodies (pure, no I/O).

`validate_request(path, body)` checks the fields each endpoint needs and returns the requested
model (or None); it raises `InvalidRequest` with a message naming the bad field. `error_body`
builds the `{"error": {...}}` JSON every failure of the API answers with.
"""

from __future__ import annotations

from typing import Any

from mesh_llm.errors import MeshError

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
PROXIED_PATHS = (CHAT_PATH, COMPLETIONS_PATH, EMBEDDINGS_PATH)

_REQUIRED_FIELD: dict[str, tuple[str, type | tuple[type, ...]]] = {
    CHAT_PATH: ("messages", list),
    COMPLETIONS_PATH: ("prompt", (str, list)),
    EMBEDDINGS_PATH: ("input", (str, list)),
}

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    502: "upstream_error",
    503: "service_unavailable",
    504: "upstream_error",
}


class InvalidRequest(MeshError):
    """A request body the API refuses with 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI-shaped error object for an HTTP status."""
    return {
        "error": {
            "message": message,
            "type": ERROR_TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }


def validate_request(path: str, body: object) -> str | None:
    """Check a decoded JSON body for `path`; returns the `model` field (None if absent)."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false", "stream")
    field, kinds = _REQUIRED_FIELD[path]
    if field not in body:
        raise InvalidRequest(f"'{field}' is required", field)
    if not isinstance(body[field], kinds):
        raise InvalidRequest(f"'{field}' has the wrong type", field)
    if path == CHAT_PATH:
        _validate_messages(body["messages"])
    return model


def _validate_messages(messages: list[Any]) -> None:
    if not messages:
        raise InvalidRequest("'messages' must not be empty", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'messages[{index}]' must be an object with a string 'role'", "messages"
            )
