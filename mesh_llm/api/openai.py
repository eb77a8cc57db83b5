"""The API's request paths and OpenAI wire shapes: validation and error bodies (pure, no I/O).

`ENDPOINTS` lists every path the API routes by `model` to a llama-server (OpenAI, Anthropic and
llama.cpp's own), with the fields each needs and the capability a model must have to answer it
(see `core/capabilities`). `validate_request(path, body)` checks those fields and returns the
requested model (or None: the mesh default); it raises `InvalidRequest` naming the bad field.
`error_body` builds the `{"error": {...}}` JSON every failure of the OpenAI paths answers with
(the Anthropic paths translate it, see `api/anthropic`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mesh_llm.core.capabilities import Capability
from mesh_llm.errors import InvalidRequest

CHAT_PATH = "/v1/chat/completions"
COMPLETIONS_PATH = "/v1/completions"
EMBEDDINGS_PATH = "/v1/embeddings"
RESPONSES_PATH = "/v1/responses"
RESPONSES_TOKENS_PATH = "/v1/responses/input_tokens"
RERANK_PATH = "/v1/rerank"
MESSAGES_PATH = "/v1/messages"
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
TOKENIZE_PATH = "/tokenize"
DETOKENIZE_PATH = "/detokenize"
APPLY_TEMPLATE_PATH = "/apply-template"
INFILL_PATH = "/infill"

_TEXT = (str, list)


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One routed path: fields it requires (name → accepted JSON types), fields checked only
    when present, and the capability a model needs for it (None: any model)."""

    path: str
    required: tuple[tuple[str, type | tuple[type, ...]], ...] = ()
    optional: tuple[tuple[str, type | tuple[type, ...]], ...] = ()
    capability: Capability | None = None
    messages: bool = False  # `messages` is a list of role objects


ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint(CHAT_PATH, (("messages", list),), (), Capability.CHAT, messages=True),
        Endpoint(COMPLETIONS_PATH, (("prompt", _TEXT),), (), Capability.COMPLETION),
        Endpoint(EMBEDDINGS_PATH, (("input", _TEXT),), (), Capability.EMBEDDINGS),
        Endpoint(RESPONSES_PATH, (("input", _TEXT),), (("instructions", str),), Capability.CHAT),
        Endpoint(RESPONSES_TOKENS_PATH, (("input", _TEXT),), (("instructions", str),)),
        Endpoint(
            RERANK_PATH,
            (("query", str),),
            (("documents", list), ("texts", list), ("top_n", int)),
            Capability.RERANK,
        ),
        Endpoint(
            MESSAGES_PATH,
            (("messages", list),),
            (("max_tokens", int), ("system", _TEXT)),
            Capability.CHAT,
            messages=True,
        ),
        Endpoint(COUNT_TOKENS_PATH, (("messages", list),), (("system", _TEXT),), messages=True),
        Endpoint(TOKENIZE_PATH, (("content", _TEXT),), (("with_pieces", bool),)),
        Endpoint(DETOKENIZE_PATH, (("tokens", list),)),
        Endpoint(APPLY_TEMPLATE_PATH, (("messages", list),), (), messages=True),
        Endpoint(
            INFILL_PATH,
            (),
            (("input_prefix", str), ("input_suffix", str), ("prompt", str)),
            Capability.INFILL,
        ),
    )
}
PROXIED_PATHS = tuple(ENDPOINTS)

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
    """Check a decoded JSON body for `path` (one of `PROXIED_PATHS`); returns the `model`
    field (None if absent). Raises `InvalidRequest`."""
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise InvalidRequest("'model' must be a string", "model")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise InvalidRequest("'stream' must be true or false", "stream")
    endpoint = ENDPOINTS[path]
    for field, kinds in endpoint.required:
        if field not in body:
            raise InvalidRequest(f"'{field}' is required", field)
        _check_type(body, field, kinds)
    for field, kinds in endpoint.optional:
        if field in body:
            _check_type(body, field, kinds)
    if endpoint.messages:
        _validate_messages(body["messages"])
    if path == RERANK_PATH and "documents" not in body and "texts" not in body:
        raise InvalidRequest("'documents' (a list of strings) is required", "documents")
    return model


def _check_type(body: dict[str, Any], field: str, kinds: type | tuple[type, ...]) -> None:
    value = body[field]
    # JSON true/false decode to bool, a subclass of int: an int field must not take them.
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _tuple(kinds)):
        raise InvalidRequest(f"'{field}' has the wrong type", field)


def _tuple(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


def _validate_messages(messages: list[Any]) -> None:
    if not messages:
        raise InvalidRequest("'messages' must not be empty", "messages")
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise InvalidRequest(
                f"'messages[{index}]' must be an object with a string 'role'", "messages"
            )
