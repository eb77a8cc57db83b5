"""Recent mesh events for the console: a bounded history and bounded per-subscriber queues.

Inputs: log records that carry an `event` field (the node logs every state change of note that
way: peers joined/suspect/dead/left, elections, backends started/ready/exited, downloads and
progress) arrive through `EventLogHandler`. Outputs: `EventHub.recent()` (the history a new
page starts from) and `Subscription.next()` (what one open page receives). Every queue is
bounded: a subscriber that reads too slowly loses its oldest events, never grows memory.
Records logged from other threads are handed to the event loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HISTORY_MAX_EVENTS = 200
SUBSCRIBER_QUEUE_MAX_EVENTS = 256
MESSAGE_MAX_CHARS = 500
_FIELDS = ("peer", "model", "workers", "state", "code")  # extra fields the page may show

Event = dict[str, Any]


class Subscription:
    """What one console page has not yet read; the oldest events go when it is full."""

    def __init__(self, limit: int) -> None:
        self._queue: deque[Event] = deque(maxlen=limit)
        self._ready = asyncio.Event()
        self.dropped = 0

    def wake(self) -> None:
        self._ready.set()

    def put(self, event: Event) -> None:
        if len(self._queue) == self._queue.maxlen:
            self.dropped += 1
        self._queue.append(event)
        self._ready.set()

    async def next(self, timeout_s: float) -> Event | None:
        """The next event, or None after `timeout_s` seconds without one (or when woken)."""
        if not self._queue:
            self._ready.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._ready.wait()
            except TimeoutError:
                return None
        return self._queue.popleft() if self._queue else None


class EventHub:
    """The event history and the open subscriptions of one console app."""

    def __init__(
        self, history_max: int = HISTORY_MAX_EVENTS, queue_max: int = SUBSCRIBER_QUEUE_MAX_EVENTS
    ) -> None:
        self._history: deque[Event] = deque(maxlen=history_max)
        self._subscribers: set[Subscription] = set()
        self._queue_max = queue_max
        self._ids = itertools.count(1)
        self.published = 0
        self.closed = False

    def close(self) -> None:
        """Wake every subscriber; streams check `closed` and end."""
        self.closed = True
        for subscriber in self._subscribers:
            subscriber.wake()

    def publish(self, event: Event) -> None:
        """Add one event (must be called on the event loop's thread)."""
        event = {"id": next(self._ids), **event}
        self.published += 1
        self._history.append(event)
        for subscriber in self._subscribers:
            subscriber.put(event)

    def recent(self) -> list[Event]:
        return list(self._history)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscribers)

    @contextmanager
    def subscribe(self) -> Iterator[Subscription]:
        subscription = Subscription(self._queue_max)
        self._subscribers.add(subscription)
        try:
            yield subscription
        finally:
            self._subscribers.discard(subscription)


def event_of(record: logging.LogRecord) -> Event | None:
    """The console event of a log record, or None if it names no event."""
    name = getattr(record, "event", None)
    if not isinstance(name, str):
        return None
    event: Event = {
        "ts": record.created,
        "event": name,
        "level": record.levelname.lower(),
        "message": record.getMessage()[:MESSAGE_MAX_CHARS],
    }
    for key in _FIELDS:
        value = getattr(record, key, None)
        if isinstance(value, str | int | float | bool):
            event[key] = value
    return event


class EventLogHandler(logging.Handler):
    """Copies records that carry an `event` field into an `EventHub` on `loop`."""

    def __init__(self, hub: EventHub, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(logging.DEBUG)
        self._hub = hub
        self._loop = loop

    def emit(self, record: logging.LogRecord) -> None:
        try:
            event = event_of(record)
        except Exception:  # a bad format string must not break the code that logged it
            self.handleError(record)
            return
        if event is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            self._hub.publish(event)
        elif not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._hub.publish, event)


@contextmanager
def capture_events(hub: EventHub, loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """Feed `hub` from the root logger while the block runs."""
    handler = EventLogHandler(hub, loop)
    root = logging.getLogger()
    root.addHandler(handler)  # records propagated from the node's loggers reach it
    try:
        yield
    finally:
        root.removeHandler(handler)
