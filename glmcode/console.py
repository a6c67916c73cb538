"""What the user sees: agent events rendered for a terminal, as plain text, or as JSON.

Three renderers share one interface (`start`, `event`, `pause`, `finish`):
- `TerminalRenderer`: rich output for a person (streaming markdown, dimmed collapsible thinking,
  one line per tool call, highlighted diffs, a status line).
- `PlainRenderer`: no colour, no cursor tricks, for pipes and logs. The answer goes to stdout;
  tool lines, notices and thinking go to stderr, so `glmcode ask ... > answer.md` keeps only
  the answer.
- `JsonRenderer`: `--output-format json` (one object at the end) or `stream-json` (one object
  per line). `EVENT_SCHEMA` below is the contract for both; `validate_event` checks it.

Agent events (ToolStarted, ToolFinished, StepStarted, Compacted) are dispatched by class name,
so this module does not depend on the agent package.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TextIO

from rich.console import Console
from rich.live import Live
from rich.markdown import Markdown
from rich.syntax import Syntax
from rich.text import Text

from glmcode.tools.base import ToolResult

# --- the JSON output contract --------------------------------------------------------------

NoneType = type(None)

# event type -> {key: allowed python types}. A result may also carry OPTIONAL_RESULT_KEYS.
EVENT_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "init": {"session_id": (str, NoneType), "model": (str,), "backend": (str,), "repo": (str,),
             "approval": (str,), "tools": (list,), "version": (str,)},
    "reasoning": {"text": (str,)},
    "message": {"text": (str,)},
    "tool_call": {"id": (str,), "name": (str,), "arguments": (dict,)},
    "tool_result": {"id": (str,), "name": (str,), "output": (str,), "is_error": (bool,),
                    "denied": (bool,)},
    "notice": {"message": (str,)},
    "error": {"message": (str,)},
    "result": {"status": (str,), "exit_code": (int,), "result": (str,), "turns": (int,),
               "duration_ms": (int,), "usage": (dict,), "session_id": (str, NoneType),
               "error": (str, NoneType)},
}
OPTIONAL_RESULT_KEYS: dict[str, tuple[type, ...]] = {"tests": (dict, NoneType), "diff": (str,)}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")
RESULT_STATUSES = ("done", "limit", "cancelled", "error", "tests_failed")


def validate_event(record: Any) -> list[str]:
    """Problems with one JSON output record against EVENT_SCHEMA (empty when it conforms)."""
    if not isinstance(record, dict):
        return ["not an object"]
    kind = record.get("type")
    if kind not in EVENT_SCHEMA:
        return [f"unknown type {kind!r}"]
    expected = dict(EVENT_SCHEMA[kind])
    optional = OPTIONAL_RESULT_KEYS if kind == "result" else {}
    problems = []
    for key, types in expected.items():
        if key not in record:
            problems.append(f"{kind}: missing {key!r}")
        elif not isinstance(record[key], types) or (bool in types) != isinstance(record[key], bool):
            problems.append(f"{kind}: {key!r} has type {type(record[key]).__name__}")
    for key, types in optional.items():
        if key in record and not isinstance(record[key], types):
            problems.append(f"{kind}: {key!r} has type {type(record[key]).__name__}")
    extra = set(record) - set(expected) - set(optional) - {"type"}
    if extra:
        problems.append(f"{kind}: unexpected keys {sorted(extra)}")
    if kind == "result":
        if record.get("status") not in RESULT_STATUSES:
            problems.append(f"result: status {record.get('status')!r} not in {RESULT_STATUSES}")
        usage = record.get("usage")
        if isinstance(usage, dict) and not all(isinstance(usage.get(k), int) for k in USAGE_KEYS):
            problems.append(f"result: usage needs integer {', '.join(USAGE_KEYS)}")
    return problems


# --- run bookkeeping -------------------------------------------------------------------------

@dataclass
class RunStats:
    """Numbers for the status line and the result record, updated from the event stream."""

    model: str
    context_window: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    context_used: int = 0
    last_prompt_cached: int = 0
    last_prompt_tokens: int = 0
    tokens_per_second: float | None = None
    _first_token_at: float | None = field(default=None, repr=False)

    def observe(self, event: Any) -> None:
        name = type(event).__name__
        if name in ("ReasoningDelta", "ContentDelta") and self._first_token_at is None:
            self._first_token_at = time.monotonic()
        elif name == "Usage":
            self.prompt_tokens += event.prompt_tokens
            self.completion_tokens += event.completion_tokens
            self.cached_tokens += event.cached_tokens
            self.last_prompt_tokens = event.prompt_tokens
            self.last_prompt_cached = event.cached_tokens
            self.context_used = event.prompt_tokens + event.completion_tokens
            if self._first_token_at is not None and event.completion_tokens > 1:
                elapsed = time.monotonic() - self._first_token_at
                if elapsed > 0:
                    self.tokens_per_second = event.completion_tokens / elapsed
        elif name in ("StepStarted", "Finish"):
            self._first_token_at = None
        elif name == "Compacted":
            self.context_used = event.after_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}

    def status_line(self) -> str:
        window = f"/{_kilo(self.context_window)}" if self.context_window else ""
        parts = [self.model, f"ctx {_kilo(self.context_used)}{window}"]
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        if self.cached_tokens:
            share = 100 * self.last_prompt_cached / self.last_prompt_tokens
            parts.append(f"cache {_kilo(self.last_prompt_cached)} ({share:.0f}%)")
        return " · ".join(parts)


def _kilo(tokens: int | None) -> str:
    if tokens is None:
        return "?"
    return f"{tokens / 1000:.1f}k" if tokens >= 1000 else str(tokens)


@dataclass
class RunReport:
    """The end of a run, as the `result` record and the text summary see it."""

    status: str
    exit_code: int
    result: str
    turns: int
    duration_ms: int
    usage: dict[str, int]
    session_id: str | None = None
    error: str | None = None
    tests: dict[str, Any] | None = None
    diff: str | None = None

    def record(self) -> dict[str, Any]:
        record = {"type": "result", **asdict(self)}
        if self.tests is None:
            del record["tests"]
        if self.diff is None:
            del record["diff"]
        return record


# --- one-line summaries, shared by the text renderers ---------------------------------------

_MAIN_ARGUMENTS = ("path", "command", "pattern", "query", "file", "paths")


def tool_call_line(name: str, arguments: dict[str, Any]) -> str:
    for key in _MAIN_ARGUMENTS:
        if key in arguments:
            value = arguments[key]
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            return f"{name} {_one_line(shown, 100)}"
    return f"{name} {_one_line(json.dumps(arguments, ensure_ascii=False), 100)}" if arguments else name


def tool_result_line(result: ToolResult, denied: bool) -> str:
    lines = result.output.splitlines()
    first = _one_line(lines[0], 100) if lines else ""
    if denied:
        return f"denied: {first}" if first else "denied"
    more = f" (+{len(lines) - 1} lines)" if len(lines) > 1 else ""
    prefix = "error: " if result.is_error else ""
    return f"{prefix}{first}{more}" if first else f"{prefix}(no output)"


def changed_files(diff: str) -> list[str]:
    """The files a unified diff touches: created or edited ones in diff order, then deleted ones."""
    names = re.findall(r"^\+\+\+ (?:b/)?(.+?)\s*$", diff, re.MULTILINE)
    names += [old for old in re.findall(r"^--- (?:a/)?(.+?)\s*$", diff, re.MULTILINE) if old != "/dev/null"]
    return [name for name in dict.fromkeys(names) if name != "/dev/null"]


def changes_line(diff: str) -> str:
    files = changed_files(diff)
    if not files:
        return "no files changed"
    return f"changed {len(files)} file{'s' if len(files) != 1 else ''}: {', '.join(files)}"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def extract_diff(text: str) -> str | None:
    """The unified diff inside a tool's output or a preview (from its first `--- ` line), if any."""
    start = re.search(r"^--- ", text, re.MULTILINE)
    if start is None or not re.search(r"^@@ .* @@", text[start.start():], re.MULTILINE):
        return None
    return text[start.start():]


# --- renderers -------------------------------------------------------------------------------

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
            tail = _one_line(self._text[-200:], 80)
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
        self.console.print(Text(f"⚠ malformed tool call: {_one_line(event.message, 160)}", style="yellow"))

    def on_Notice(self, event: Any) -> None:
        self.pause()
        self.console.print(Text(event.message, style="yellow"))

    def on_Error(self, event: Any) -> None:
        self.pause()
        self.console.print(Text(f"error: {event.message}", style="bold red"))

    def on_Compacted(self, event: Any) -> None:
        self.pause()
        before, after = _kilo(event.before_tokens), _kilo(event.after_tokens)
        self.console.print(Text(f"context compacted: {before} → {after} tokens", style="dim"))

    def on_Finish(self, event: Any) -> None:
        self.pause()

    def preview_shown(self, diff: str) -> None:
        self._previewed_diff = diff.strip()

    def print_diff(self, diff: str) -> None:
        self.console.print(Syntax(diff.rstrip("\n"), "diff", theme="ansi_dark", background_color="default"))

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
        self._note(f"malformed tool call: {_one_line(event.message, 160)}")

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
            self.err.write(report.error + "\n")
        self.out.flush()
        self.err.flush()


class JsonRenderer(Renderer):
    """`stream-json`: each event as one JSON line; `json`: only the result object at the end."""

    def __init__(self, stats: RunStats, out: TextIO, *, stream: bool) -> None:
        super().__init__(stats)
        self.out = out
        self.stream = stream
        self._block: str | None = None
        self._text = ""
        self._announced_calls: set[str] = set()

    def _emit(self, record: dict[str, Any]) -> None:
        if self.stream:
            self.out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self.out.flush()

    def _close_block(self) -> None:
        if self._block and self._text:
            self._emit({"type": "reasoning" if self._block == "reasoning" else "message", "text": self._text})
        self._block, self._text = None, ""

    def _add(self, kind: str, text: str) -> None:
        if self._block != kind:
            self._close_block()
            self._block = kind
        self._text += text

    def start(self, info: dict[str, Any]) -> None:
        self._emit({"type": "init", **info})

    def on_ReasoningDelta(self, event: Any) -> None:
        self._add("reasoning", event.text)

    def on_ContentDelta(self, event: Any) -> None:
        self._add("content", event.text)

    def _announce(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        if call_id not in self._announced_calls:
            self._announced_calls.add(call_id)
            self._emit({"type": "tool_call", "id": call_id, "name": name, "arguments": arguments})

    def on_ToolStarted(self, event: Any) -> None:
        self._close_block()
        self._announce(event.call_id, event.name, event.arguments)

    def on_ToolFinished(self, event: Any) -> None:
        self._close_block()
        self._announce(event.call_id, event.name, {})  # a no-op after ToolStarted, which carries the arguments
        self._emit({"type": "tool_result", "id": event.call_id, "name": event.name, "output": event.result.output,
                    "is_error": event.result.is_error, "denied": event.denied})

    def on_ToolCallError(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "error", "message": f"malformed tool call: {event.message}"})

    def on_Notice(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "notice", "message": event.message})

    def on_Error(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "error", "message": event.message})

    def on_Compacted(self, event: Any) -> None:
        self._close_block()
        message = f"context compacted: {event.before_tokens} -> {event.after_tokens} tokens"
        self._emit({"type": "notice", "message": message})

    def on_Finish(self, event: Any) -> None:
        self._close_block()

    def pause(self) -> None:
        self._close_block()

    def finish(self, report: RunReport) -> None:
        self._close_block()
        self.out.write(json.dumps(report.record(), ensure_ascii=False, default=str) + "\n")
        self.out.flush()


def make_renderer(output_format: str, stats: RunStats, *, show_thinking: bool = False,
                  stdout: TextIO | None = None, stderr: TextIO | None = None) -> Renderer:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if output_format in ("json", "stream-json"):
        return JsonRenderer(stats, stdout, stream=output_format == "stream-json")
    if stdout.isatty():
        return TerminalRenderer(stats, Console(file=stdout, highlight=False), show_thinking=show_thinking)
    return PlainRenderer(stats, stdout, stderr, show_thinking=show_thinking)


# --- approval prompts ------------------------------------------------------------------------

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
            self.console.print(Syntax(diff.rstrip("\n"), "diff", theme="ansi_dark", background_color="default"))
        elif preview:
            self.console.print(Text("  $ " + preview, style="bold"))


def _always_key(tool_name: str, arguments: dict[str, Any]) -> tuple[str, ...]:
    if "command" in arguments:
        return (tool_name, str(arguments["command"]))
    return (tool_name,)
