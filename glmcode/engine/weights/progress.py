"""The one progress bar of weight loading and conversion: bytes read, with the time left."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def byte_progress(description: str, total: int, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A bar over `total` bytes (on stderr, gone when done); yields `advance(nbytes)`."""
    bar = Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=True,
    )
    with bar:
        task = bar.add_task(description, total=total)
        yield lambda nbytes: bar.advance(task, nbytes)
