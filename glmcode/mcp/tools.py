"""MCP tools as glmcode tools: `mcp__SERVER__TOOL`, the server's JSON schema, approval like a command.

A tool the server marks read-only (`readOnlyHint`) runs without approval, like glmcode's own
read tools, only where the server's config says `trust_read_only = true`: the hint is the
server's word, not something glmcode can check. Allow and deny rules name MCP tools by their
full name (`deny_commands = ["mcp__git__git_commit"]`).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from glmcode.mcp.client import McpServers, McpTool
from glmcode.tools.base import Tool

PREFIX = "mcp__"
MAX_NAME = 64  # what OpenAI-style function names allow
_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


def mcp_tools(servers: McpServers) -> list[Tool]:
    """A glmcode Tool for each tool of each running server, with unique model-safe names."""
    tools: list[Tool] = []
    taken: set[str] = set()
    for tool in servers.tools():
        name = qualified_name(tool.server, tool.name, taken)
        taken.add(name)
        tools.append(_as_tool(servers, tool, name))
    return tools


def qualified_name(server: str, tool: str, taken: set[str] = frozenset()) -> str:  # type: ignore[assignment]
    name = _UNSAFE.sub("_", f"{PREFIX}{server}__{tool}")
    if len(name) > MAX_NAME or name in taken:
        digest = hashlib.sha1(f"{server}\0{tool}".encode()).hexdigest()[:8]
        name = f"{name[: MAX_NAME - 9]}_{digest}"
    return name


def _as_tool(servers: McpServers, tool: McpTool, name: str) -> Tool:
    trusted = tool.read_only and servers.states[tool.server].config.trust_read_only
    description = tool.description.strip() or f"The tool {tool.name} of the MCP server '{tool.server}'."

    def run(workspace: Any, arguments: dict[str, Any]) -> Any:
        return servers.call(tool.server, tool.name, arguments)

    def preview(workspace: Any, arguments: dict[str, Any]) -> str:
        return f"{name} {json.dumps(arguments, ensure_ascii=False)}"

    return Tool(name=name, description=description, parameters=_object_schema(tool.input_schema),
                kind="read" if trusted else "command", run=run, preview=preview, rule_name=name)


def _object_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """The server's input schema, with the object shape the chat template and argument checks expect."""
    schema = dict(schema)
    schema.setdefault("type", "object")
    schema.setdefault("properties", {})
    return schema
