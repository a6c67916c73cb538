"""One-line summaries of tool calls, tool results and diffs, shared by the text renderers."""

from __future__ import annotations

import json
import re
from typing import Any

from glmcode.tools.base import ToolResult

_MAIN_ARGUMENTS = ("path", "command", "pattern", "query", "file", "paths")


def tool_call_line(name: str, arguments: dict[str, Any]) -> str:
    for key in _MAIN_ARGUMENTS:
        if key in arguments:
            value = arguments[key]
            shown = " ".join(map(str, value)) if isinstance(value, list) else str(value)
            return f"{name} {one_line(shown, 100)}"
    return f"{name} {one_line(json.dumps(arguments, ensure_ascii=False), 100)}" if arguments else name


def tool_result_line(result: ToolResult, denied: bool) -> str:
    lines = result.output.splitlines()
    first = one_line(lines[0], 100) if lines else ""
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


def one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"


def extract_diff(text: str) -> str | None:
    """The unified diff inside a tool's output or a preview (from its first `--- ` line), if any."""
    start = re.search(r"^--- ", text, re.MULTILINE)
    if start is None or not re.search(r"^@@ .* @@", text[start.start():], re.MULTILINE):
        return None
    return text[start.start():]
