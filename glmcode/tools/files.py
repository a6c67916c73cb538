"""File tools: read_file, write_file, edit_file, list_files, glob."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.edit_match import apply_edit
from glmcode.tools.listing import glob_matcher
from glmcode.tools.textfile import TextFile, decode, is_binary, unified_diff
from glmcode.tools.workspace import ToolError, Workspace, atomic_write

MAX_FILE_BYTES = 10_000_000
MAX_READ_LINES = 2000
MAX_READ_CHARS = 100_000
MAX_LINE_CHARS = 2000
MAX_LISTED = 500
MAX_DIFF_LINES = 80


# -- read_file --------------------------------------------------------------------------------


def _read_bytes(workspace: Workspace, path: Path) -> bytes:
    shown = workspace.relative(path)
    if path.is_dir():
        raise ToolError(f"{shown} is a directory; use list_files to see what it holds")
    if not path.is_file():
        raise ToolError(f"{shown}: no such file")
    size = path.stat().st_size
    if size > MAX_FILE_BYTES:
        raise ToolError(f"{shown} is too large ({size:,} bytes); use grep to find what you need in it")
    return path.read_bytes()


def _read_text(workspace: Workspace, path: Path) -> tuple[bytes, TextFile]:
    data = _read_bytes(workspace, path)
    if is_binary(data):
        shown = workspace.relative(path)
        raise ToolError(f"{shown} is a binary file ({len(data):,} bytes); text tools cannot show or change it")
    return data, decode(data)


def read_file(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    path = workspace.resolve(arguments["path"])
    data, file = _read_text(workspace, path)
    workspace.record_read(path, data)
    lines = file.text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the newline that ends the last line does not start another
    if not lines:
        return ToolResult("[the file is empty]")
    start = max(1, int(arguments.get("start_line") or 1))
    end = min(len(lines), int(arguments.get("end_line") or len(lines)))
    if start > len(lines):
        raise ToolError(f"start_line {start} is past the end of the file ({len(lines)} lines)")
    if end < start:
        raise ToolError(f"end_line {end} is before start_line {start}")
    shown: list[str] = []
    chars = 0
    for number in range(start, min(end, start + MAX_READ_LINES - 1) + 1):
        line = lines[number - 1]
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + f" [... line cut at {MAX_LINE_CHARS} characters]"
        chars += len(line)
        if chars > MAX_READ_CHARS and shown:
            break
        shown.append(f"{number:6}\t{line}")
    last = start + len(shown) - 1
    if start > 1 or last < len(lines):
        note = f"[lines {start}-{last} of {len(lines)}"
        note += f"; read more with start_line={last + 1}]" if last < end else "]"
        shown.append(note)
    return ToolResult("\n".join(shown))


READ_FILE = Tool(
    name="read_file",
    description=(
        "Read a text file of the repository. Lines come numbered (number, tab, text); the numbers are "
        f"not part of the file. Up to {MAX_READ_LINES} lines per call: use start_line/end_line for "
        "longer files. Read a file before editing it. Binary files are refused."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "File path relative to the repository root."},
            "start_line": {"type": "integer", "description": "First line to show, 1-based (default 1)."},
            "end_line": {"type": "integer", "description": "Last line to show, inclusive (default: end of file)."},
        },
        "required": ["path"],
    },
    kind="read",
    run=read_file,
)


# -- write_file / edit_file -------------------------------------------------------------------


@dataclass(frozen=True)
class _PlannedWrite:
    path: Path
    old_text: str | None  # None: a new file
    new_text: str
    file: TextFile  # how to encode the result
    summary: str = ""  # what an edit did, for the result


def _plan_write(workspace: Workspace, arguments: dict[str, Any]) -> _PlannedWrite:
    path = workspace.resolve(arguments["path"])
    content = arguments["content"].replace("\r\n", "\n")
    if not path.exists():
        if path.parent.exists() and not path.parent.is_dir():
            raise ToolError(f"{workspace.relative(path.parent)} is a file, not a directory")
        return _PlannedWrite(path, None, content, TextFile(""))
    data, file = _read_text(workspace, path)
    workspace.check_unchanged(path, data)
    return _PlannedWrite(path, file.text, content, file)


def _plan_edit(workspace: Workspace, arguments: dict[str, Any]) -> _PlannedWrite:
    path = workspace.resolve(arguments["path"])
    if not path.exists():
        raise ToolError(f"{workspace.relative(path)}: no such file; use write_file to create it")
    data, file = _read_text(workspace, path)
    workspace.check_unchanged(path, data)
    old = arguments["old_string"].replace("\r\n", "\n")
    new = arguments["new_string"].replace("\r\n", "\n")
    replacement = apply_edit(file.text, old, new, replace_all=bool(arguments.get("replace_all", False)))
    plural = "s" if replacement.count > 1 else ""
    summary = f"{replacement.count} replacement{plural} starting at line {replacement.first_line}"
    if replacement.strategy != "exact":
        summary += f" (matched {replacement.strategy})"
    return _PlannedWrite(path, file.text, replacement.text, file, summary)


def _apply(workspace: Workspace, planned: _PlannedWrite) -> str:
    """Write a planned change; returns its (capped) diff."""
    data = planned.file.encode(planned.new_text)
    atomic_write(planned.path, data)
    workspace.record_read(planned.path, data)
    return _capped_diff(unified_diff(planned.old_text, planned.new_text, workspace.relative(planned.path)))


def _capped_diff(diff: str) -> str:
    lines = diff.splitlines()
    if len(lines) <= MAX_DIFF_LINES:
        return diff.rstrip("\n")
    return "\n".join(lines[:MAX_DIFF_LINES] + [f"[... {len(lines) - MAX_DIFF_LINES} more diff lines]"])


def write_file(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    planned = _plan_write(workspace, arguments)
    _apply(workspace, planned)
    shown = workspace.relative(planned.path)
    count = _line_count(planned.new_text)
    if planned.old_text is None:
        return ToolResult(f"Created {shown} ({count} lines)")
    return ToolResult(f"Wrote {shown} ({count} lines, was {_line_count(planned.old_text)})")


def edit_file(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    planned = _plan_edit(workspace, arguments)
    diff = _apply(workspace, planned)
    return ToolResult(f"Edited {workspace.relative(planned.path)}: {planned.summary}\n{diff}")


def _line_count(text: str) -> int:
    return text.count("\n") + (1 if text and not text.endswith("\n") else 0)


def planned_change(workspace: Workspace, tool_name: str,
                   arguments: dict[str, Any]) -> tuple[Path, str | None, str] | None:
    """(path, old text or None for a new file, new text) that write_file or edit_file would make;
    None for any other tool, or a call that would fail. For editors that show a change whole."""
    plan = {WRITE_FILE.name: _plan_write, EDIT_FILE.name: _plan_edit}.get(tool_name)
    if plan is None:
        return None
    try:
        planned = plan(workspace, arguments)
    except Exception:  # noqa: BLE001 - the run reports the problem
        return None
    return planned.path, planned.old_text, planned.new_text


def _preview(plan: Callable[[Workspace, dict[str, Any]], _PlannedWrite]) -> Callable[..., str | None]:
    """The diff a planned change would make, for an approval prompt; None if it would fail."""

    def preview(workspace: Workspace, arguments: dict[str, Any]) -> str | None:
        try:
            planned = plan(workspace, arguments)
        except Exception:  # noqa: BLE001 - the run reports the problem; a preview just has none
            return None
        return unified_diff(planned.old_text, planned.new_text, workspace.relative(planned.path))

    return preview


def _touched_path(workspace: Workspace, arguments: dict[str, Any]) -> list[Path] | None:
    try:
        return [workspace.resolve(arguments["path"])]
    except Exception:  # noqa: BLE001 - a bad path fails the run itself; nothing to checkpoint
        return []


WRITE_FILE = Tool(
    name="write_file",
    description=(
        "Create a file, or replace the whole content of an existing one (read it first). Parent "
        "directories are created. An existing file keeps its encoding, line endings and permissions. "
        "For changes to part of a file prefer edit_file."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "File path relative to the repository root."},
            "content": {"type": "string", "description": "The complete new content of the file."},
        },
        "required": ["path", "content"],
    },
    kind="edit",
    run=write_file,
    preview=_preview(_plan_write),
    touched_paths=_touched_path,
)

EDIT_FILE = Tool(
    name="edit_file",
    description=(
        "Replace old_string with new_string in a file you have read (and that has not changed since). "
        "Copy old_string exactly from the file, without read_file's line-number prefix, with enough "
        "surrounding lines to be unique; it must match exactly one place unless replace_all is true. "
        "Small whitespace or indentation differences are tolerated and new_string is re-indented to fit. "
        "Returns the diff."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "File path relative to the repository root."},
            "old_string": {"type": "string", "description": "The exact text to replace (non-empty)."},
            "new_string": {"type": "string", "description": "The text to put in its place (may be empty)."},
            "replace_all": {
                "type": "boolean",
                "description": "Replace every occurrence of old_string instead of exactly one (default false).",
            },
        },
        "required": ["path", "old_string", "new_string"],
    },
    kind="edit",
    run=edit_file,
    preview=_preview(_plan_edit),
    touched_paths=_touched_path,
)


# -- list_files / glob ------------------------------------------------------------------------


def _directory(workspace: Workspace, arguments: dict[str, Any]) -> Path:
    directory = workspace.resolve(arguments.get("path") or ".")
    if not directory.is_dir():
        raise ToolError(f"{workspace.relative(directory)} is not a directory")
    return directory


def _capped_listing(paths: list[str], hint: str) -> str:
    if not paths:
        return "(no files)"
    if len(paths) <= MAX_LISTED:
        return "\n".join(paths)
    return "\n".join(paths[:MAX_LISTED] + [f"[... {len(paths) - MAX_LISTED} more; {hint}]"])


def list_files(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    directory = _directory(workspace, arguments)
    files = workspace.files(under=directory)
    depth = arguments.get("depth")
    if depth:
        base = 0 if directory == workspace.root else len(workspace.relative(directory).split("/"))
        files = _collapse_deeper(files, base + int(depth))
    return ToolResult(_capped_listing(files, "pass a subdirectory as path, or a depth"))


def _collapse_deeper(files: list[str], depth: int) -> list[str]:
    """Show files up to `depth` components; deeper ones collapse into "dir/ (N files)"."""
    counts: dict[str, int] = {}
    for name in files:
        parts = name.split("/")
        key = name if len(parts) <= depth else "/".join(parts[:depth]) + "/"
        counts[key] = counts.get(key, 0) + 1
    return [key if not key.endswith("/") else f"{key} ({n} files)" for key, n in counts.items()]


LIST_FILES = Tool(
    name="list_files",
    description=(
        "List the repository's files (recursively, .gitignore respected), paths relative to the root. "
        "Use depth to get an overview of a large tree: deeper files are summarized per directory."
    ),
    parameters={
        "type": "object",
        "properties": {
            "path": {"type": "string", "description": "Directory to list (default: the repository root)."},
            "depth": {"type": "integer", "description": "Show at most this many directory levels below path."},
        },
        "required": [],
    },
    kind="read",
    run=list_files,
)


def glob(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    directory = _directory(workspace, arguments)
    matches = glob_matcher(arguments["pattern"])
    offset = 0 if directory == workspace.root else len(workspace.relative(directory)) + 1
    matched = [name for name in workspace.files(under=directory) if matches(name[offset:])]
    return ToolResult(_capped_listing(matched, "use a narrower pattern"))


GLOB = Tool(
    name="glob",
    description=(
        "Find files by name pattern (.gitignore respected). `*` matches within a path component, `**` "
        "across directories, `?` one character. A pattern without `/` matches file names at any depth "
        "(`*.py`); one with `/` matches paths relative to `path` (`src/**/test_*.py`)."
    ),
    parameters={
        "type": "object",
        "properties": {
            "pattern": {"type": "string", "description": "Glob pattern, e.g. `*.py` or `src/**/*.ts`."},
            "path": {"type": "string", "description": "Directory to search in (default: the repository root)."},
        },
        "required": ["pattern"],
    },
    kind="read",
    run=glob,
)
