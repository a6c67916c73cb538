"""`PlainRenderer`: no colour, no cursor tricks, for pipes and logs.

The answer goes to stdout; tool lines, notices and thinking go to stderr, so
`glmcode ask ... > answer.md` keeps only the answer.
"""

from __future__ import annotations

from typing import Any, TextIO

from glmcode.console.base import Renderer
from glmcode.console.lines import changes_line, one_line, tool_call_line, tool_result_line
from glmcode.console.report import RunReport, RunStats


class PlainRenderer(Renderer):
    """Text without colour codes: the answer to `out`, everything else to `err`."""

    def __init__(self, stats: RunStats, out: TextIO, err: TextIO, *, show_thinking: bool = False) -> None:
        super().__init__(stats)
        self.out, self.err = out, err
        self.show_thinking = show_thinking
        self._block: str | None = None
        self._answer_ends_with_newline = True

    def _switch(self, kind: str | None) -> None:
        if self._block == kind:
            return
        if self._block == "reasoning" and self.show_thinking:
            self.err.write("\n")
        if self._block == "content" and not self._answer_ends_with_newline:
            self.out.write("\n")
            self._answer_ends_with_newline = True
        self._block = kind
        self.out.flush()
        self.err.flush()

    def _note(self, line: str) -> None:
        self._switch(None)
        self.err.write(line + "\n")
        self.err.flush()

    def on_ReasoningDelta(self, event: Any) -> None:
        self._switch("reasoning")
        if self.show_thinking:
            self.err.write(event.text)

    def on_ContentDelta(self, event: Any) -> None:
        self._switch("content")
        self.out.write(event.text)
        self.out.flush()
        if event.text:
            self._answer_ends_with_newline = event.text.endswith("\n")

    def on_ToolStarted(self, event: Any) -> None:
        self._note("> " + tool_call_line(event.name, event.arguments))

    def on_ToolFinished(self, event: Any) -> None:
        self._note("  " + tool_result_line(event.result, event.denied))

    def on_ToolCallError(self, event: Any) -> None:
        self._note(f"malformed tool call: {one_line(event.message, 160)}")

    def on_Notice(self, event: Any) -> None:
        self._note(event.message)

    def on_Error(self, event: Any) -> None:
        self._note(f"error: {event.message}")

    def on_Compacted(self, event: Any) -> None:
        self._note(f"context compacted: {event.before_tokens} -> {event.after_tokens} tokens")

    def on_Finish(self, event: Any) -> None:
        self._switch(None)

    def pause(self) -> None:
        self._switch(None)

    def finish(self, report: RunReport) -> None:
        self._switch(None)
        if report.tests is not None:
            tests = report.tests
            if tests.get("command") is None:
                self.out.write("tests: not run (no test command found; set test_command)\n")
            else:
                verdict = "pass" if tests.get("passed") else "FAIL"
                self.out.write(f"tests: {verdict} ({tests['command']})\n")
                if not tests.get("passed"):
                    self.out.write(tests.get("output", "").rstrip("\n") + "\n")
        if report.diff is not None:
            self.out.write(changes_line(report.diff) + "\n")
        if report.diff:
            self.out.write(report.diff if report.diff.endswith("\n") else report.diff + "\n")
        if report.status != "done" and report.error:
            self.err.write(f"glmcode: {report.error}\n")
        self.out.flush()
        self.err.flush()
