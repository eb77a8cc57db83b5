"""The node's management endpoint on the console port (loopback only).

`GET /api/status` answers a JSON snapshot of what the node sees (itself, its peers, its models);
`mesh-llm status` reads it. `GET /` serves the static console page from `console/`. The data
comes from a `StatusSource` (the node); this module only formats and serves it. The page's files
are package data of `mesh_llm` (read with `importlib.resources`).
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

# The page ships inside the package (`mesh_llm/console` links to the top-level `console/` in a
# checkout; a wheel carries the files themselves), so an installed node serves it too.
CONSOLE_DIR = Path(str(importlib.resources.files("mesh_llm") / "console"))


class StatusSource(Protocol):
    def status(self) -> dict[str, Any]: ...


def create_console_app(source: StatusSource) -> web.Application:
    app = web.Application()

    async def status(request: web.Request) -> web.Response:
        return web.json_response(source.status())

    async def index(request: web.Request) -> web.StreamResponse:
        page = CONSOLE_DIR / "index.html"
        if page.is_file():
            return web.FileResponse(page)
        return web.Response(text="mesh-llm: console files not installed; see /api/status")

    app.router.add_get("/api/status", status)
    app.router.add_get("/", index)
    if CONSOLE_DIR.is_dir():
        app.router.add_static("/static/", CONSOLE_DIR)
    return app
