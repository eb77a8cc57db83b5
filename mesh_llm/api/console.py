"""The node's console and management endpoint on the console port (loopback only).

`GET /api/status` answers a JSON snapshot of what the node sees (itself, its peers, its models)
plus `view`, the page's data (`console_view`); `mesh-llm status` reads it. `GET /api/events` is
a server-sent event stream: a `snapshot` (status and recent events) at connect, then `status`
whenever the view changed (checked every `console_change_poll_s`) and at least every
`console_status_interval_s` (both from the node's config), and an `event` for every mesh
event logged (`console_events`). `POST /api/chat` takes an OpenAI chat body and goes through the
API's own `Proxy` (the same routing, failover, admission and errors as `/v1/chat/completions`).
`GET /` serves the static page from the package's `console/` files unless the node is headless
(then 404; `/api/*` stays). Every answer carries a strict Content-Security-Policy.
"""

from __future__ import annotations

import asyncio
import importlib.resources
import json
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from mesh_llm.api.console_events import EventHub, capture_events
from mesh_llm.api.console_view import console_view
from mesh_llm.api.openai import CHAT_PATH, error_body, validate_request
from mesh_llm.api.proxy import Proxy, json_error
from mesh_llm.api.request_id import request_id_of
from mesh_llm.config import Config
from mesh_llm.errors import InvalidRequest

# The page ships inside the package (`mesh_llm/console` links to the top-level `console/` in a
# checkout; a wheel carries the files themselves), so an installed node serves it too.
CONSOLE_DIR = Path(str(importlib.resources.files("mesh_llm") / "console"))
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data:; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
HUB_KEY = web.AppKey("events", EventHub)


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...


ProxyOf = Callable[[], Proxy | None]


def create_console_app(
    source: StatusSource,
    *,
    proxy: ProxyOf | None = None,
    headless: bool = False,
    config: Config | None = None,
) -> web.Application:
    """The console app; `proxy` gives the API's `Proxy` once the API is up (None before);
    `config` (None: the defaults) the event stream's intervals."""
    config = config or Config()
    app = web.Application()
    app[HUB_KEY] = EventHub()

    async def events_from_logs(app: web.Application) -> AsyncIterator[None]:
        with capture_events(app[HUB_KEY], asyncio.get_running_loop()):
            yield

    async def end_streams(app: web.Application) -> None:
        app[HUB_KEY].close()  # open event streams end now, not at the shutdown timeout

    app.cleanup_ctx.append(events_from_logs)
    app.on_shutdown.append(end_streams)
    app.on_response_prepare.append(_secure)
    console = _Console(source, proxy or (lambda: None), app[HUB_KEY], config)
    app.router.add_get("/api/status", console.status)
    app.router.add_get("/api/events", console.events)
    app.router.add_post("/api/chat", console.chat)
    if not headless:
        app.router.add_get("/", console.index)
        if CONSOLE_DIR.is_dir():
            app.router.add_static("/static/", CONSOLE_DIR)
    return app


async def _secure(request: web.Request, response: web.StreamResponse) -> None:
    """Every console answer (pages, JSON, streams, errors, chat relayed by the proxy)."""
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "no-referrer"


class _Console:
    def __init__(self, source: StatusSource, proxy: ProxyOf, hub: EventHub, config: Config) -> None:
        self._source = source
        self._proxy = proxy
        self._hub = hub
        self._status_interval_s = config.console_status_interval_s
        self._change_poll_s = config.console_change_poll_s

    def _status(self) -> dict[str, Any]:
        status = self._source.status()
        return status | {"view": console_view(status)}

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self._status())

    async def index(self, request: web.Request) -> web.StreamResponse:
        page = CONSOLE_DIR / "index.html"
        if page.is_file():
            return web.FileResponse(page)
        return web.Response(text="mesh-llm: console files not installed; see /api/status")

    async def events(self, request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store"}
        )
        await response.prepare(request)
        loop = asyncio.get_running_loop()
        with self._hub.subscribe() as subscription:
            status = self._status()
            await _send(response, "snapshot", {"status": status, "events": self._hub.recent()})
            sent_view, sent_at = status["view"], loop.time()
            while not self._hub.closed:
                event = await subscription.next(self._change_poll_s)
                if event is not None:
                    await _send(response, "event", event)
                    continue
                status = self._status()
                if status["view"] != sent_view or loop.time() - sent_at >= self._status_interval_s:
                    await _send(response, "status", status)
                    sent_view, sent_at = status["view"], loop.time()
        return response

    async def chat(self, request: web.Request) -> web.StreamResponse:
        request_id = request_id_of(request)
        proxy = self._proxy()
        if proxy is None:
            return json_error(503, "the API is not up yet; try again", "not_ready")
        # The proxy forwards the request's path: the same request, as the chat endpoint.
        as_chat = request.clone(rel_url=CHAT_PATH)
        raw = await as_chat.read()
        try:
            body = json.loads(raw)
            requested = validate_request(CHAT_PATH, body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            message = f"the request body is not valid JSON: {exc}"
            return web.json_response(error_body(400, message, "invalid_request"), status=400)
        except InvalidRequest as exc:
            body = error_body(400, str(exc), "invalid_request", exc.param)
            return web.json_response(body, status=400)
        return await proxy.handle(as_chat, requested, raw, request_id)


async def _send(response: web.StreamResponse, name: str, data: Any) -> None:
    payload = json.dumps(data, separators=(",", ":"))
    await response.write(f"event: {name}\ndata: {payload}\n\n".encode())
