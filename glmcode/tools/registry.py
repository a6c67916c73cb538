"""The one place that lists the tools, checks a call's arguments and runs it without raising."""

from __future__ import annotations

from typing import Any

from glmcode.errors import GlmcodeError
from glmcode.tools import files, git, repo_map, search, shell
from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.workspace import ToolError, Workspace

_TOOLS: tuple[Tool, ...] = (
    files.READ_FILE,
    files.LIST_FILES,
    files.GLOB,
    search.GREP,
    repo_map.REPO_MAP,
    files.EDIT_FILE,
    files.WRITE_FILE,
    shell.RUN_COMMAND,
    shell.RUN_TESTS,
    git.GIT_STATUS,
    git.GIT_DIFF,
    git.GIT_LOG,
)
_BY_NAME = {tool.name: tool for tool in _TOOLS}


def all_tools() -> list[Tool]:
    return list(_TOOLS)


def read_only_tools() -> list[Tool]:
    return [tool for tool in _TOOLS if tool.kind == "read"]


def get_tool(name: str) -> Tool | None:
    return _BY_NAME.get(name)


def run_tool(tool: Tool, workspace: Workspace, arguments: Any) -> ToolResult:
    """Run one tool call. Never raises: bad arguments, refused paths and failures become error results."""
    try:
        checked = check_arguments(tool, arguments)
        return tool.run(workspace, checked)
    except (ToolError, GlmcodeError) as error:  # GlmcodeError covers SandboxError
        return ToolResult(f"Error: {error}", is_error=True)
    except OSError as error:
        return ToolResult(f"Error: {error.strerror or error}: {error.filename or ''}".rstrip(": "), is_error=True)
    except Exception as error:  # noqa: BLE001 - a tool bug must not end the session
        return ToolResult(f"Error: {tool.name} failed unexpectedly: {type(error).__name__}: {error}", is_error=True)


_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,), "array": (list,),
    "object": (dict,),
}


def check_arguments(tool: Tool, arguments: Any) -> dict[str, Any]:
    """The arguments with JSON-ish strings coerced to the schema's types; ToolError if they do not fit."""
    if not isinstance(arguments, dict):
        raise ToolError(f"{tool.name} takes an object of named arguments, got {type(arguments).__name__}")
    properties: dict[str, Any] = tool.parameters.get("properties", {})
    expected = ", ".join(properties) or "none"
    unknown = [key for key in arguments if key not in properties]
    if unknown:
        raise ToolError(f"{tool.name} has no argument {unknown[0]!r} (its arguments: {expected})")
    missing = [key for key in tool.parameters.get("required", []) if arguments.get(key) is None]
    if missing:
        raise ToolError(f"{tool.name} needs the argument {missing[0]!r} (its arguments: {expected})")
    checked = {}
    for key, value in arguments.items():
        if value is None:
            continue
        schema = properties[key]
        kind = schema.get("type") if isinstance(schema, dict) else None
        if not isinstance(kind, str):  # no single declared type (anyOf, a list of types): as given
            checked[key] = value
            continue
        value = _coerce(value, kind)
        is_number_but_bool = kind in ("integer", "number") and isinstance(value, bool)
        if not isinstance(value, _TYPES.get(kind, (object,))) or is_number_but_bool:
            raise ToolError(f"{tool.name}: argument {key!r} must be of type {kind}, got {value!r:.80}")
        checked[key] = value
    return checked


def _coerce(value: Any, kind: str) -> Any:
    """Accept the obvious spellings a model produces in text form: "12", "true", 3.0 for 3."""
    if kind == "integer":
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
        if isinstance(value, float) and value.is_integer():
            return int(value)
    if kind == "number" and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    if kind == "boolean" and isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if kind == "string" and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    return value
