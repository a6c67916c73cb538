"""grep: search file contents with a Python regular expression."""

from __future__ import annotations

import re
from typing import Any

from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.listing import glob_matcher
from glmcode.tools.textfile import decode, is_binary
from glmcode.tools.workspace import ToolError, Workspace

DEFAULT_MAX_RESULTS = 100
MAX_RESULTS = 500
MAX_SEARCHED_BYTES = 2_000_000  # larger files are skipped (generated data, bundles)
MAX_SHOWN_LINE = 300


def grep(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    flags = re.IGNORECASE if arguments.get("ignore_case") else 0
    try:
        regex = re.compile(arguments["pattern"], flags)
    except re.error as error:
        raise ToolError(f"invalid regular expression: {error}") from None
    target = workspace.resolve(arguments.get("path") or ".")
    if target.is_file():
        names = [workspace.relative(target)]
    elif target.is_dir():
        names = workspace.files(under=target)
    else:
        raise ToolError(f"{workspace.relative(target)}: no such file or directory")
    if arguments.get("glob"):
        matches = glob_matcher(arguments["glob"])
        offset = 0 if target == workspace.root or target.is_file() else len(workspace.relative(target)) + 1
        names = [name for name in names if matches(name[offset:])]
    limit = min(int(arguments.get("max_results") or DEFAULT_MAX_RESULTS), MAX_RESULTS)

    hits: list[str] = []
    more = False
    for name in names:
        for number, line in _matching_lines(workspace, name, regex):
            if len(hits) == limit:
                more = True
                break
            shown = line if len(line) <= MAX_SHOWN_LINE else line[:MAX_SHOWN_LINE] + " [...]"
            hits.append(f"{name}:{number}: {shown}")
        if more:
            break
    if not hits:
        return ToolResult("No matches.")
    if more:
        hits.append(f"[stopped at {limit} matches; narrow the pattern, path or glob to see the rest]")
    return ToolResult("\n".join(hits))


def _matching_lines(workspace: Workspace, name: str, regex: re.Pattern[str]):
    path = workspace.root / name
    try:
        if path.stat().st_size > MAX_SEARCHED_BYTES:
            return
        data = path.read_bytes()
    except OSError:
        return
    if is_binary(data):
        return
    for number, line in enumerate(decode(data).text.split("\n"), start=1):
        if regex.search(line):
            yield number, line


GREP = Tool(
    name="grep",
    description=(
        "Search file contents with a Python regular expression, line by line (.gitignore respected; "
        "binary and very large files skipped). Prints `path:line: text` for each matching line, "
        f"at most {DEFAULT_MAX_RESULTS} by default."
    ),
    parameters={
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Python regular expression, e.g. `def \\w+_test`."},
            "path": {"type": "string", "description": "File or directory to search (default: the repository root)."},
            "glob": {"type": "string", "description": "Only search files matching this glob, e.g. `*.py`."},
            "ignore_case": {"type": "boolean", "description": "Case-insensitive search (default false)."},
            "max_results": {
                "type": "integer",
                "description": f"Stop after this many lines (default {DEFAULT_MAX_RESULTS}, max {MAX_RESULTS}).",
            },
        },
        "required": ["pattern"],
    },
    kind="read",
    run=grep,
)
