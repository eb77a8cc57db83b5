"""Request ids: every API request has one, every response and log line carries it.

`request_ids` is the outermost middleware of the API: it takes the client's `X-Request-Id` when
it is short and printable (so it cannot forge log lines), else makes one, stores it on the
request (`request_id_of`) and in the `REQUEST_ID` context variable that the log filter reads,
and `add_request_id_header` (an `on_response_prepare` signal) puts it on every response —
streamed, proxied or error — just before its head is sent. Imports no other API module.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Awaitable, Callable

from aiohttp import web

from mesh_llm.logs import REQUEST_ID

REQUEST_ID_HEADER = "X-Request-Id"
REQUEST_ID_MAX_CHARS = 128
_ACCEPTED = re.compile(rf"[A-Za-z0-9._:/+=-]{{1,{REQUEST_ID_MAX_CHARS}}}")
_REQUEST_ID_KEY = web.RequestKey("request_id", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def new_request_id() -> str:
    return uuid.uuid4().hex


def accepted_request_id(header: str | None) -> str:
    """The client's id when it is acceptable (≤ 128 printable, no spaces), else a new one."""
    if header is not None and _ACCEPTED.fullmatch(header):
        return header
    return new_request_id()


def request_id_of(request: web.Request) -> str:
    """The id `request_ids` gave this request (a new one if the middleware did not run)."""
    if _REQUEST_ID_KEY not in request:
        request[_REQUEST_ID_KEY] = accepted_request_id(request.headers.get(REQUEST_ID_HEADER))
    return request[_REQUEST_ID_KEY]


@web.middleware
async def request_ids(request: web.Request, handler: Handler) -> web.StreamResponse:
    token = REQUEST_ID.set(request_id_of(request))
    try:
        return await handler(request)
    finally:
        REQUEST_ID.reset(token)


async def add_request_id_header(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[REQUEST_ID_HEADER] = request_id_of(request)
