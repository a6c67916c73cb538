"""The interface every renderer has: `start`, `event`, `pause`, `preview_shown`, `finish`."""

from __future__ import annotations

from typing import Any

from glmcode.console.report import RunReport, RunStats


class Renderer:
    """Base: keeps the stats and dispatches events to `on_<ClassName>` methods."""

    def __init__(self, stats: RunStats) -> None:
        self.stats = stats

    def start(self, info: dict[str, Any]) -> None:
        pass

    def event(self, event: Any) -> None:
        self.stats.observe(event)
        handler = getattr(self, "on_" + type(event).__name__, None)
        if handler is not None:
            handler(event)

    def pause(self) -> None:
        """Close any live region before someone else writes to the terminal (a prompt)."""

    def preview_shown(self, diff: str) -> None:
        """An approval prompt showed this diff; the tool's result need not show it again."""

    def finish(self, report: RunReport) -> None:
        pass
