"""The approval prompt: the human side of `--approval ask` at a terminal."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.text import Text

from glmcode.console.base import Renderer
from glmcode.console.lines import extract_diff
from glmcode.console.terminal import diff_view


class ApprovalPrompt:
    """The human side of approval: shows the diff or command and asks y / n / a(lways).

    "always" covers the same tool for edits, and the same command line for commands, until the
    session ends. Ctrl-C at the prompt refuses and calls `on_interrupt` (stop the run).
    """

    def __init__(self, renderer: Renderer, console: Console, read_line: Callable[[str], str],
                 on_interrupt: Callable[[], None] | None = None) -> None:
        self.renderer = renderer
        self.console = console
        self.read_line = read_line
        self.on_interrupt = on_interrupt
        self._always: set[tuple[str, ...]] = set()

    def __call__(self, request: Any) -> bool:
        key = _always_key(request.tool_name, request.arguments)
        if key in self._always:
            return True
        self.renderer.pause()
        self._show_preview(request.preview or "")
        self.renderer.preview_shown(extract_diff(request.preview or "") or "")
        question = f"Allow {request.tool_name}? [y]es / [n]o / [a]lways this session: "
        while True:
            try:
                answer = self.read_line(question).strip().lower()
            except (KeyboardInterrupt, EOFError):
                if self.on_interrupt:
                    self.on_interrupt()
                return False
            if answer in ("y", "yes"):
                return True
            if answer in ("n", "no", ""):
                return False
            if answer in ("a", "always"):
                self._always.add(key)
                return True

    def _show_preview(self, preview: str) -> None:
        """The diff or the command line; the tool's own line is already on screen (ToolStarted)."""
        diff = extract_diff(preview)
        if diff:
            self.console.print(diff_view(diff))
        elif preview:
            self.console.print(Text("  $ " + preview, style="bold"))


def _always_key(tool_name: str, arguments: dict[str, Any]) -> tuple[str, ...]:
    if "command" in arguments:
        return (tool_name, str(arguments["command"]))
    return (tool_name,)
