"""`RateLimitedLog`: the first lines of a window are logged, the rest counted in one line."""

from __future__ import annotations

import logging

import pytest

from mesh_llm.logs import RateLimitedLog


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_flood_is_logged_as_its_first_lines_and_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="test.flood")
    clock = Clock()
    limited = RateLimitedLog(logging.getLogger("test.flood"), 3, "things refused", clock)
    for i in range(10):
        limited.log(logging.WARNING, "refused %d", i, event="refused")
    assert [r.getMessage() for r in caplog.records] == ["refused 0", "refused 1", "refused 2"]
    assert [getattr(r, "event", None) for r in caplog.records] == ["refused"] * 3
    clock.now += 1.0  # a new window: the count of the last one first, then lines again
    limited.log(logging.WARNING, "refused %d", 10)
    assert [r.getMessage() for r in caplog.records[3:]] == [
        "7 more things refused (not logged one by one)",
        "refused 10",
    ]
    limited.flush()  # nothing left out since
    assert len(caplog.records) == 5


def test_flush_sums_up_the_tail_of_a_flood(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="test.tail")
    limited = RateLimitedLog(logging.getLogger("test.tail"), 1, "things", Clock())
    limited.log(logging.INFO, "one")
    limited.log(logging.INFO, "two")
    limited.flush()
    assert [r.getMessage() for r in caplog.records] == [
        "one",
        "1 more things (not logged one by one)",
    ]
