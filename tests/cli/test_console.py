"""Rendering the event stream: JSON records that match the schema, plain text without escapes,
and the terminal view (tool lines, thinking summary, diffs, status line)."""

from __future__ import annotations

import io
import json

from rich.console import Console

from glmcode.console import (
    JsonRenderer,
    PlainRenderer,
    RunReport,
    RunStats,
    TerminalRenderer,
    changed_files,
    validate_event,
)
from glmcode.events import ContentDelta, Error, Finish, Notice, ReasoningDelta, ToolCallError, Usage

from .conftest import ANSI_ESCAPE

BACKEND_EVENTS = [
    ReasoningDelta("The user wants "), ReasoningDelta("a greeting."),
    ContentDelta("Hello"), ContentDelta(", world.\n\nSecond paragraph."),
    Usage(prompt_tokens=1200, completion_tokens=40, cached_tokens=1000),
    ToolCallError(raw="<tool_call>x", message="unknown tool x"),
    Notice("rate limited; retrying in 2s"),
    Error("the server closed the stream"),
    Finish("stop"),
]


def _report(**changes: object) -> RunReport:
    fields = {"status": "done", "exit_code": 0, "result": "Hello, world.", "turns": 1, "duration_ms": 1234,
              "usage": {"prompt_tokens": 1200, "completion_tokens": 40, "cached_tokens": 1000}, "session_id": "s1"}
    fields.update(changes)
    return RunReport(**fields)


def test_stream_json_emits_one_valid_record_per_line_and_merges_deltas() -> None:
    out = io.StringIO()
    renderer = JsonRenderer(RunStats(model="m"), out, stream=True)
    renderer.start({"session_id": "s1", "model": "m", "backend": "replay", "repo": "/r", "approval": "ask", "sandbox": "off",
                    "tools": ["read_file"], "version": "0"})
    for event in BACKEND_EVENTS:
        renderer.event(event)
    renderer.finish(_report(tests={"command": "pytest", "passed": True, "exit_code": 0, "output": ""}, diff=""))
    records = [json.loads(line) for line in out.getvalue().splitlines()]
    for record in records:
        assert validate_event(record) == [], record
    assert [r["type"] for r in records] == ["init", "reasoning", "message", "error", "notice", "error", "result"]
    assert records[1]["text"] == "The user wants a greeting."
    assert records[2]["text"] == "Hello, world.\n\nSecond paragraph."
    assert records[-1]["tests"]["passed"] is True


def test_json_prints_only_the_result_object() -> None:
    out = io.StringIO()
    renderer = JsonRenderer(RunStats(model="m"), out, stream=False)
    renderer.start({"session_id": None, "model": "m", "backend": "replay", "repo": "/r", "approval": "ask", "sandbox": "off",
                    "tools": [], "version": "0"})
    for event in BACKEND_EVENTS:
        renderer.event(event)
    renderer.finish(_report())
    record = json.loads(out.getvalue())
    assert validate_event(record) == [] and record["result"] == "Hello, world."
    assert "tests" not in record and "diff" not in record


def test_the_validator_catches_missing_and_mistyped_fields() -> None:
    good = _report().record()
    assert validate_event(good) == []
    assert validate_event({**good, "turns": "1"}) == ["result: 'turns' has type str"]
    assert validate_event({**good, "exit_code": True}) != []
    assert validate_event({k: v for k, v in good.items() if k != "usage"}) == ["result: missing 'usage'"]
    assert validate_event({**good, "status": "great"}) != []
    assert validate_event({**good, "usage": {"prompt_tokens": 1}}) != []
    assert validate_event({"type": "telemetry"}) == ["unknown type 'telemetry'"]
    assert validate_event({"type": "message", "text": "x", "extra": 1}) != []


def test_plain_output_has_no_escape_codes_and_keeps_the_answer_alone_on_stdout() -> None:
    out, err = io.StringIO(), io.StringIO()
    renderer = PlainRenderer(RunStats(model="m"), out, err, show_thinking=False)
    for event in BACKEND_EVENTS:
        renderer.event(event)
    renderer.finish(_report(status="tests_failed", exit_code=5, error="the tests still fail",
                            tests={"command": "pytest -q", "passed": False, "exit_code": 1, "output": "1 failed"},
                            diff="--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-a\n+b\n"))
    assert out.getvalue().startswith("Hello, world.\n\nSecond paragraph.\n")
    assert "tests: FAIL (pytest -q)\n1 failed\nchanged 1 file: x.py\n--- a/x.py" in out.getvalue()
    assert "+b\n" in out.getvalue()
    assert "The user wants" not in out.getvalue() + err.getvalue(), "thinking hidden unless asked for"
    assert "unknown tool x" in err.getvalue() and "rate limited" in err.getvalue()
    assert "the tests still fail" in err.getvalue()
    assert not ANSI_ESCAPE.search(out.getvalue() + err.getvalue())


def test_terminal_view_summarizes_thinking_renders_markdown_and_shows_the_status_line() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=100, color_system="truecolor")
    stats = RunStats(model="GLM-4.7-Flash", context_window=202752)
    renderer = TerminalRenderer(stats, console)
    for event in [ReasoningDelta("Let me think about it carefully."), ContentDelta("# Title\n\nSome **bold** text."),
                  Usage(prompt_tokens=2000, completion_tokens=50, cached_tokens=1500), Finish("stop")]:
        renderer.event(event)
    renderer.finish(_report(turns=2))
    plain = ANSI_ESCAPE.sub("", buffer.getvalue())
    assert "Thought for 6 words" in plain
    assert renderer.last_reasoning == "Let me think about it carefully."
    assert "Title" in plain and "bold" in plain and "**bold**" not in plain
    assert "GLM-4.7-Flash · ctx 2.0k/202.8k" in plain and "cache 1.5k (75%)" in plain
    assert ANSI_ESCAPE.search(buffer.getvalue()), "a terminal gets colour"


def test_status_line_reports_tokens_per_second_from_usage() -> None:
    stats = RunStats(model="m")
    stats.observe(ContentDelta("x"))
    stats.observe(Usage(prompt_tokens=10, completion_tokens=20, cached_tokens=0))
    assert stats.tokens_per_second is not None and stats.tokens_per_second > 0
    assert "tok/s" in stats.status_line()
    assert stats.usage() == {"prompt_tokens": 10, "completion_tokens": 20, "cached_tokens": 0}


def test_changed_files_lists_created_edited_and_deleted_files() -> None:
    diff = ("--- a/old.py\n+++ /dev/null\n@@ -1 +0,0 @@\n-x\n"
            "--- /dev/null\n+++ b/new.py\n@@ -0,0 +1 @@\n+y\n"
            "--- a/pkg/mod.py\n+++ b/pkg/mod.py\n@@ -1 +1 @@\n-a\n+b\n")
    assert changed_files(diff) == ["new.py", "pkg/mod.py", "old.py"]
    assert changed_files("") == []
