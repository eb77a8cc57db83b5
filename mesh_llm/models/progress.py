"""Progress reporting for long blocking model work (downloads, demo assembly).

`ProgressCallback(done_bytes, total_bytes_or_None)` is called from the worker thread doing the
work; `rich_progress` turns it into a rich progress bar for the terminal commands. Imports no
network or file code.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

ProgressCallback = Callable[[int, int | None], None]
"""Called with (bytes done, total bytes or None when unknown)."""


@contextmanager
def rich_progress(description: str, console: Console | None = None) -> Iterator[ProgressCallback]:
    """A rich progress bar for the duration of the block; yields the callback that drives it.

    The callback is thread-safe, so the work may run in another thread.
    """
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    lock = threading.Lock()
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int | None) -> None:
            with lock:
                bar.update(task, completed=done, total=total)

        yield update
