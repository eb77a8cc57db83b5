"""`OwnedTasks`: the group is there only while `hold()` runs, and its tasks end with it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mesh_llm.tasks import OwnedTasks


async def _started(
    tasks: OwnedTasks,
    on_start: Callable[[], None] | None = None,
    on_stop: Callable[[], None] | None = None,
) -> asyncio.Task[None]:
    """`tasks.hold()` as a task, once its group is open (and `on_start` ran)."""
    started = asyncio.Event()

    def start() -> None:
        if on_start is not None:
            on_start()
        started.set()

    holding = asyncio.create_task(tasks.hold(on_start=start, on_stop=on_stop))
    await started.wait()
    return holding


async def _cancel(task: asyncio.Task[None]) -> None:
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def _fail() -> None:
    raise ValueError("broken")


async def test_the_group_exists_only_while_holding() -> None:
    tasks = OwnedTasks()
    assert tasks.group is None
    holding = await _started(tasks)
    assert isinstance(tasks.group, asyncio.TaskGroup)
    await _cancel(holding)
    assert tasks.group is None


async def test_cancelling_hold_cancels_and_awaits_the_tasks_of_the_group() -> None:
    tasks = OwnedTasks()
    holding = await _started(tasks)
    running, ended = asyncio.Event(), []

    async def forever() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            ended.append("child")

    assert tasks.group is not None
    child = tasks.group.create_task(forever())
    await running.wait()
    await _cancel(holding)
    assert ended == ["child"] and child.cancelled()


async def test_on_start_sees_the_group_and_on_stop_runs_before_the_tasks_end() -> None:
    tasks = OwnedTasks()
    order: list[str] = []
    running = asyncio.Event()

    async def child() -> None:
        running.set()
        try:
            await asyncio.Event().wait()
        finally:
            order.append("child ended")

    def on_start() -> None:
        assert tasks.group is not None
        order.append("started")
        tasks.group.create_task(child())

    def on_stop() -> None:
        assert tasks.group is not None  # still open: its tasks have not been cancelled yet
        order.append("stopping")

    holding = await _started(tasks, on_start, on_stop)
    await running.wait()
    await _cancel(holding)
    assert order == ["started", "stopping", "child ended"]
    assert tasks.group is None


async def test_a_failing_task_ends_hold_with_its_error_and_runs_on_stop() -> None:
    tasks = OwnedTasks()
    stopped: list[bool] = []
    holding = await _started(tasks, on_stop=lambda: stopped.append(True))
    assert tasks.group is not None
    tasks.group.create_task(_fail())
    with pytest.raises(ExceptionGroup) as caught:
        await holding
    assert caught.group_contains(ValueError)
    assert stopped == [True] and tasks.group is None


async def test_an_ending_group_refuses_new_tasks() -> None:
    tasks = OwnedTasks()
    refused: list[bool] = []

    async def late() -> None:
        pass

    def on_stop() -> None:
        group = tasks.group
        assert group is not None
        coroutine = late()
        try:
            group.create_task(coroutine)
        except RuntimeError:
            coroutine.close()
            refused.append(True)

    holding = await _started(tasks, on_stop=on_stop)
    assert tasks.group is not None
    tasks.group.create_task(_fail())  # the group aborts: on_stop runs while it is ending
    with pytest.raises(ExceptionGroup):
        await holding
    assert refused == [True]
