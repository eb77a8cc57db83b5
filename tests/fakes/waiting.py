"""Polling a condition with a deadline inside async tests (never a bare sleep); running an
object's `run()` for the length of a block."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import pytest

DEFAULT_DEADLINE_S = 10.0
POLL_INTERVAL_S = 0.01


async def wait_until(
    condition: Callable[[], bool], what: str, timeout_s: float = DEFAULT_DEADLINE_S
) -> None:
    """Poll `condition` until true; fail naming `what` after `timeout_s`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not condition():
        if loop.time() > deadline:
            pytest.fail(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(POLL_INTERVAL_S)


@contextlib.asynccontextmanager
async def running(work: Coroutine[Any, Any, None]) -> AsyncIterator[asyncio.Task[None]]:
    """Run `work` (an object's `run()`) for the duration of the block, then `stop` it."""
    task = start(work)
    try:
        yield task
    finally:
        await stop(task)


def start(work: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
    """Run `work` (an object's `run()`) as a task of the test; end it with `stop`."""
    return asyncio.get_running_loop().create_task(work)


async def stop(task: asyncio.Task[None]) -> None:
    """Cancel a task from `start` and wait for it to end; an error it ended with is raised."""
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise  # this test itself is being cancelled
