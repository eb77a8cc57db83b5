"""A node's drain on shutdown: which API requests are in flight, and refusing new ones.

Every request that may take long — a model request from a local client (answered here or
relayed to another node) and a request another node sends this node over the mesh — is
counted while it runs. When the node stops, `start()` flips it to draining: new model requests
get 503 with `Retry-After` (a requester node retries them on another replica), the ones in
flight run on, and `wait_idle(timeout_s)` returns once none is left or the grace ran out. Only
then does the node leave the mesh and stop its children, so a stream in flight ends with its
last event instead of being cut. Imports only asyncio and aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator

from aiohttp import web
from aiohttp.typedefs import Middleware

from mesh_llm.api.proxy import json_error

log = logging.getLogger(__name__)

SHUTTING_DOWN_CODE = "shutting_down"
SHUTTING_DOWN_MESSAGE = "this node is shutting down; retry on another node"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Drain:
    """The in-flight count of a node's long requests and its draining flag."""

    def __init__(self) -> None:
        self._active = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.draining = False

    @property
    def active(self) -> int:
        """Requests in flight now."""
        return self._active

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        """Count one request while the block runs."""
        self._active += 1
        self._idle.clear()
        try:
            yield
        finally:
            self._active -= 1
            if self._active == 0:
                self._idle.set()

    def start(self) -> None:
        """Refuse new requests from now on (the ones in flight run on)."""
        self.draining = True

    async def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight, at most `timeout_s` seconds; True if none is."""
        try:
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        except TimeoutError:
            return False
        return True

    async def finish(self, grace_s: float) -> None:
        """Refuse new requests and let the ones in flight finish within `grace_s` (logged:
        how many there were, and how many were cut when the grace ran out)."""
        self.start()
        log.info(
            "shutting down: %d request(s) in flight get up to %.0f s",
            self._active,
            grace_s,
            extra={"event": "node_stopping", "in_flight": self._active},
        )
        if not await self.wait_idle(grace_s):
            log.warning(
                "shutdown grace over: %d request(s) still in flight are cut",
                self._active,
                extra={"event": "drain_expired", "in_flight": self._active},
            )


def drain_middleware(drain: Drain, paths: Collection[str], retry_after_s: int) -> Middleware:
    """An aiohttp middleware that counts requests to `paths` and, while the node drains,
    refuses them with an OpenAI-shaped 503."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path not in paths:
            return await handler(request)
        if drain.draining:
            return json_error(
                503, SHUTTING_DOWN_MESSAGE, SHUTTING_DOWN_CODE, retry_after_s=retry_after_s
            )
        with drain.track():
            return await handler(request)

    return middleware
