"""Admission of requests to local backends: at most `depth` in flight per model, else 429.

`LocalAdmission.try_acquire(model)` takes a slot and returns its `release` callable (idempotent),
or None when the model already has `depth` requests in flight — the caller then answers 429 with
`Retry-After`. No waiting queue: llama-server queues internally past its slots, this bounds that
queue so a flood fails fast instead of timing out. Used on the event loop only (no locks).
`in_flight()` feeds the queue-depth gauge of `/metrics`. Imports no I/O module.
"""

from __future__ import annotations

from collections.abc import Callable

Release = Callable[[], None]


class LocalAdmission:
    """Per-model counters of requests in flight on this node's backends."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError(f"queue depth must be at least 1, not {depth}")
        self.depth = depth
        self._in_flight: dict[str, int] = {}

    def try_acquire(self, model: str) -> Release | None:
        """A slot for one request to `model`: its release callable, or None when full."""
        count = self._in_flight.get(model, 0)
        if count >= self.depth:
            return None
        self._in_flight[model] = count + 1
        released = False

        def release() -> None:
            nonlocal released
            if released:
                return
            released = True
            remaining = self._in_flight[model] - 1
            if remaining:
                self._in_flight[model] = remaining
            else:
                del self._in_flight[model]

        return release

    def in_flight(self) -> dict[str, int]:
        """Requests in flight per model (models with none are absent)."""
        return dict(self._in_flight)
