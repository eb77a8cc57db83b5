"""Polling a condition with a deadline inside async tests (never a bare sleep)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

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
