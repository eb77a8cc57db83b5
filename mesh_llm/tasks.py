"""`OwnedTasks`: the TaskGroup an object owns for the length of its `run()`.

Long-lived objects (the QUIC endpoint, the fast-lane server, the RPC tunnels, the HTTP peer
client, the route puller) create tasks from callbacks and methods that run while their `run()`
is in progress, and every such task must end when that `run()` ends. Each keeps an
`OwnedTasks`; its `run()` awaits `hold()`, which opens a TaskGroup, makes it available as
`group`, and waits until cancelled. `group` is None before `hold()` starts and again once it
has ended, so a caller can tell "not running" (queue the work for later, or refuse it) from
"running"; a group that is already ending raises `RuntimeError` from `create_task`, as any
TaskGroup does. `on_start` runs once the group is there (to start work queued before
`run()`); `on_stop` runs as soon as `hold()` is cancelled, before the group cancels and awaits
its tasks (to stop accepting new work while the old ends).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class OwnedTasks:
    """One TaskGroup, open while `hold()` runs (until cancelled); see the module docstring."""

    def __init__(self) -> None:
        self._group: asyncio.TaskGroup | None = None

    @property
    def group(self) -> asyncio.TaskGroup | None:
        """The open group while `hold()` runs, else None."""
        return self._group

    async def hold(
        self,
        *,
        on_start: Callable[[], None] | None = None,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Own the group until cancelled; then its tasks are cancelled and awaited. A task that
        fails ends it early, as with any TaskGroup (its `ExceptionGroup` propagates)."""
        try:
            async with asyncio.TaskGroup() as group:
                self._group = group
                if on_start is not None:
                    on_start()
                try:
                    await asyncio.Event().wait()  # until cancelled
                finally:
                    if on_stop is not None:
                        on_stop()
        finally:
            self._group = None
