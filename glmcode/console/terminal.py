"""`TerminalRenderer`: rich output for a person (streaming markdown, dimmed collapsible
thinking, one line per tool call, highlighted diffs, a status line)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.syntax import Syntax
from rich.text import Text

from glmcode.console.base import Renderer
from glmcode.console.lines import changes_line, extract_diff, one_line, tool_call_line, tool_result_line
from glmcode.console.report import RunReport, RunStats, kilo


def diff_view(diff: str) -> Syntax:
    """A unified diff, highlighted for the terminal."""
    return Syntax(diff.rstrip("\n"), "diff", theme="ansi_dark", background_color="default")


class TerminalRenderer(Renderer):
    """Rich output for a person at a terminal."""

    def __init__(self, stats: RunStats, console: Console, *, show_thinking: bool = False) -> None:
        super().__init__(stats)
        self.console = console
        self.show_thinking = show_thinking
        self.last_reasoning = ""
        self._block: str | None = None  # "reasoning" | "content"
        self._text = ""
        self._live: Live | None = None
        self._previewed_diff: str | None = None

    # blocks of streamed text

    def _open(self, kind: str) -> None:
        if self._block == kind:
            return
        self.pause()
        self._block, self._text = kind, ""
        if kind == "content" or not self.show_thinking:
            self._live = Live(console=self.console, auto_refresh=False, transient=kind == "reasoning",
                              vertical_overflow="visible")
            self._live.start()

    def pause(self) -> None:
        if self._block == "content":
            self._flush_markdown(final=True)
        elif self._block == "reasoning":
            self.last_reasoning = self._text
            if self.show_thinking:
                self.console.print()
        if self._live is not None:
            self._live.stop()
            self._live = None
        if self._block == "reasoning" and not self.show_thinking and self._text.strip():
            words = len(self._text.split())
            self.console.print(Text(f"✻ Thought for {words} word{'s' if words != 1 else ''} (/think to expand)",
                                    style="dim italic"))
        self._block, self._text = None, ""

    def _flush_markdown(self, final: bool) -> None:
        """Print finished paragraphs for good; keep only the unfinished tail in the live region."""
        stable, tail = (self._text, "") if final else _split_stable_markdown(self._text)
        if stable.strip():
            if self._live is not None:
                self._live.update(Text(""), refresh=True)
            self.console.print(Markdown(stable))
        self._text = tail
        if self._live is not None and not final:
            self._live.update(Markdown(tail), refresh=True)

    def on_ReasoningDelta(self, event: Any) -> None:
        self._open("reasoning")
        self._text += event.text
        if self.show_thinking:
            self.console.print(Text(event.text, style="dim italic"), end="")
        elif self._live is not None:
            tail = one_line(self._text[-200:], 80)
            self._live.update(Text(f"✻ Thinking… {tail}", style="dim italic"), refresh=True)

    def on_ContentDelta(self, event: Any) -> None:
        self._open("content")
        self._text += event.text
        self._flush_markdown(final=False)

    # one line per tool call

    def on_ToolStarted(self, event: Any) -> None:
        self.pause()
        self.console.print(Text("⏺ ", style="cyan") + Text(tool_call_line(event.name, event.arguments), style="bold"))

    def on_ToolFinished(self, event: Any) -> None:
        self.pause()
        failed = event.denied or event.result.is_error
        line = Text("  ⎿ " + tool_result_line(event.result, event.denied), style="red" if failed else "dim")
        self.console.print(line)
        diff = extract_diff(event.result.output)
        if not failed and diff and diff.strip() != self._previewed_diff:
            self.print_diff(diff)
        self._previewed_diff = None

    def on_ToolCallError(self, event: Any) -> None:
        self.pause()
        self.console.print(Text(f"⚠ malformed tool call: {one_line(event.message, 160)}", style="yellow"))

    def on_Notice(self, event: Any) -> None:
        self.pause()
        self.console.print(Text(event.message, style="yellow"))

    def on_Error(self, event: Any) -> None:
        self.pause()
        self.console.print(Text(f"error: {event.message}", style="bold red"))

    def on_Compacted(self, event: Any) -> None:
        self.pause()
        before, after = kilo(event.before_tokens), kilo(event.after_tokens)
        self.console.print(Text(f"context compacted: {before} → {after} tokens", style="dim"))

    def on_Finish(self, event: Any) -> None:
        self.pause()

    def preview_shown(self, diff: str) -> None:
        self._previewed_diff = diff.strip()

    def print_diff(self, diff: str) -> None:
        self.console.print(diff_view(diff))

    def finish(self, report: RunReport) -> None:
        self.pause()
        if report.tests is not None:
            self._print_tests(report.tests)
        if report.diff is not None:
            self.console.print(Text(changes_line(report.diff), style="bold"))
        if report.diff:
            self.print_diff(report.diff)
        if report.status != "done" and report.error:
            self.console.print(Text(report.error, style="bold red" if report.exit_code else "yellow"))
        self.console.print(Text(f"{self.stats.status_line()} · {report.turns} turns · "
                                f"{report.duration_ms / 1000:.1f}s", style="dim"))

    def _print_tests(self, tests: dict[str, Any]) -> None:
        if tests.get("passed"):
            self.console.print(Text(f"✓ tests pass: {tests['command']}", style="bold green"))
        elif tests.get("command"):
            self.console.print(Text(f"✗ tests fail: {tests['command']}", style="bold red"))
            self.console.print(Text(tests.get("output", ""), style="dim"))
        else:
            self.console.print(Text("tests not run: no test command found (set test_command)", style="yellow"))


def _split_stable_markdown(text: str) -> tuple[str, str]:
    """Split at the last blank line that is outside a code fence: (finished part, open tail)."""
    cut = 0
    in_fence = False
    position = 0
    for line in text.splitlines(keepends=True):
        position += len(line)
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
        elif not in_fence and not line.strip() and line.endswith("\n"):
            cut = position
    return text[:cut], text[cut:]
