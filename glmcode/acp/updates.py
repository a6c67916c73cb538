"""How the agent's work looks to an ACP client: tool kinds, titles, locations, diffs, and prompts.

Pure translation, no I/O beyond reading the files an edit would change: the session
(glmcode.acp.agent) decides when each update is sent.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from acp import text_block, tool_content, tool_diff_content
from acp.schema import ToolCallLocation

from glmcode.mcp.tools import PREFIX as MCP_PREFIX
from glmcode.tools.files import planned_change

_KINDS = {
    "read_file": "read", "list_files": "read", "glob": "search", "grep": "search", "repo_map": "read",
    "edit_file": "edit", "write_file": "edit", "run_command": "execute", "run_tests": "execute",
    "git_status": "read", "git_diff": "read", "git_log": "read",
}
_TITLES = {
    "read_file": "Read {path}", "list_files": "List {path}", "glob": "Find {pattern}", "grep": "Search for {pattern}",
    "repo_map": "Map the repository", "edit_file": "Edit {path}", "write_file": "Write {path}",
    "run_command": "Run `{command}`", "run_tests": "Run the tests", "git_status": "git status",
    "git_diff": "git diff", "git_log": "git log",
}
MAX_SHOWN_OUTPUT = 20_000  # characters of a tool's output shown in the editor (the model sees its own cap)


def tool_kind(name: str) -> str:
    return _KINDS.get(name, "fetch" if name.startswith(MCP_PREFIX) else "other")


def tool_title(name: str, arguments: dict[str, Any]) -> str:
    if name.startswith(MCP_PREFIX):
        server, _, tool = name[len(MCP_PREFIX):].partition("__")
        return f"{tool} ({server} MCP server)"
    template = _TITLES.get(name)
    if template is None:
        return name
    values = {key: _one_line(arguments.get(key, "")) for key in ("path", "pattern", "command")}
    values["path"] = values["path"] or "."
    return template.format(**values)


def tool_locations(repo: Path, arguments: dict[str, Any]) -> list[ToolCallLocation] | None:
    path = arguments.get("path")
    if not isinstance(path, str) or not path:
        return None
    line = arguments.get("start_line")
    return [ToolCallLocation(path=str((repo / path).resolve()), line=line if isinstance(line, int) else None)]


def planned_diff(workspace: Any, name: str, arguments: dict[str, Any]) -> Any:
    """The whole-file diff an edit would make (what an editor shows), or None."""
    change = planned_change(workspace, name, arguments)
    if change is None:
        return None
    path, old_text, new_text = change
    return tool_diff_content(str(path), new_text, old_text)


def output_content(output: str) -> Any:
    shown = output if len(output) <= MAX_SHOWN_OUTPUT else output[:MAX_SHOWN_OUTPUT] + "\n[... cut for display]"
    return tool_content(text_block(shown))


def prompt_text(blocks: list[Any]) -> str:
    """One user message from the prompt's content blocks (text, attached files, links)."""
    parts: list[str] = []
    for block in blocks:
        kind = getattr(block, "type", "")
        if kind == "text":
            parts.append(block.text)
        elif kind == "resource":
            resource = block.resource
            text = getattr(resource, "text", None)
            name = _path_of(resource.uri)
            parts.append(f"Attached file {name}:\n```\n{text.rstrip()}\n```" if text is not None
                         else f"(attached {name}: binary content, not shown)")
        elif kind == "resource_link":
            parts.append(f"(see {_path_of(block.uri)})")
        elif kind in ("image", "audio"):
            parts.append(f"({kind} attachment left out: this model reads text only)")
    return "\n\n".join(part for part in parts if part.strip())


def _path_of(uri: str) -> str:
    parsed = urlparse(uri)
    return unquote(parsed.path) if parsed.scheme == "file" else uri


def _one_line(value: Any) -> str:
    text = re.sub(r"\s+", " ", str(value)).strip()
    return text if len(text) <= 80 else text[:77] + "..."
