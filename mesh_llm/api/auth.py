"""API-key authentication of the API (`--api-key`, `MESH_LLM_API_KEY`, `api.api_key`).

`bearer_auth(key)` is an aiohttp middleware: every request but the probes in `OPEN_PATHS` must
carry `Authorization: Bearer <key>` or Anthropic's `x-api-key: <key>`, compared in constant
time; otherwise the answer is 401 OpenAI-shaped JSON with `WWW-Authenticate: Bearer` (the error
middleware reshapes it on the Anthropic paths). `/metrics` is protected too (Prometheus
scrapers send bearer tokens: `authorization: {credentials: KEY}`). `warn_if_exposed` logs the
warning for an API on all interfaces without a key. Knows nothing of routing or proxying.
"""

from __future__ import annotations

import hashlib
import hmac
import logging

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from mesh_llm.api.openai import error_body
from mesh_llm.config import ApiConfig

log = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/healthz", "/readyz"})
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_SCHEME = "bearer"


def bearer_auth(api_key: str) -> Middleware:
    """The middleware that refuses requests without `Authorization: Bearer <api_key>`."""
    expected = _digest(api_key)

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        presented = _bearer_token(request.headers.get("Authorization"))
        if presented is None:
            presented = _plain_key(request.headers.get("x-api-key"))
        if presented is None:
            return _unauthorized(
                "missing API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'"
            )
        if not hmac.compare_digest(_digest(presented), expected):
            return _unauthorized("invalid API key")
        return await handler(request)

    return authenticate


def _digest(key: str) -> bytes:
    # Comparing fixed-size digests hides the key's length as well as its bytes.
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _bearer_token(header: str | None) -> str | None:
    if header is None:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != _SCHEME or not token.strip():
        return None
    return token.strip()


def _plain_key(header: str | None) -> str | None:
    if header is None or not header.strip():
        return None
    return header.strip()


def _unauthorized(message: str) -> web.Response:
    return web.json_response(
        error_body(401, message, "invalid_api_key"),
        status=401,
        headers={"WWW-Authenticate": 'Bearer realm="mesh-llm"'},
    )


def warn_if_exposed(config: ApiConfig) -> bool:
    """Log a warning when the API listens beyond loopback without a key; True if it warned."""
    if config.host in LOOPBACK_HOSTS or config.api_key is not None:
        return False
    log.warning(
        "the API listens on %s:%d WITHOUT an API key: anyone who can reach this port can use "
        "the mesh. Set --api-key KEY (or MESH_LLM_API_KEY) so that clients must send "
        "'Authorization: Bearer KEY'.",
        config.host,
        config.port,
        extra={"event": "api_exposed_without_key"},
    )
    return True
