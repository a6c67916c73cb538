"""`[mcp_servers.NAME]` tables: which MCP servers to start and how to reach them.

```toml
[mcp_servers.git]                      # stdio: glmcode runs the command
command = "mcp-server-git"
args = ["--repository", "."]
env = { GIT_AUTHOR_NAME = "glmcode" }  # added to a minimal environment (PATH, HOME, ...)
cwd = "."                              # relative to the repository root (the default)

[mcp_servers.docs]                     # streamable HTTP
url = "https://mcp.example.com/mcp"
headers = { Authorization = "Bearer ${DOCS_TOKEN}" }
```

Both kinds take `enabled` (default true), `tools` (an allow-list of the server's tool names),
`startup_timeout_sec` (30), `tool_timeout_sec` (120) and `trust_read_only` (false: when true,
tools the server marks read-only run without approval, like glmcode's own read tools).
Values in `env` and `headers` may name environment variables as `${VAR}`, so a key stays out of
the file. A table in the repository's `.glmcode.toml` overrides the user's table of the same
name key by key (`enabled = false` alone turns a user server off for one repository).

This module is plain data: it imports nothing from the MCP SDK, so loading settings stays cheap.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmcode.errors import UsageError

NAME = re.compile(r"^[A-Za-z0-9_-]+$")
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
# Environment entries whose values are credentials by their name; header values always are.
_SECRET_NAME = re.compile(r"(?i)(KEY|TOKEN|SECRET|PASSWORD|PASSWD|AUTH|CREDENTIAL|COOKIE)")
MIN_SECRET_LENGTH = 8  # shorter values would shred ordinary words when masked

DEFAULT_STARTUP_TIMEOUT = 30.0
DEFAULT_TOOL_TIMEOUT = 120.0

_KEYS = {
    "command": "the program to run (stdio)",
    "args": "its arguments",
    "env": "environment variables for it",
    "cwd": "its working directory",
    "url": "a streamable HTTP endpoint",
    "headers": "HTTP headers",
    "enabled": "true or false",
    "tools": "the tools to expose (default: all)",
    "startup_timeout_sec": "seconds to wait for it to start",
    "tool_timeout_sec": "seconds to wait for one tool call",
    "trust_read_only": "run tools it marks read-only without approval",
}


class McpConfigError(UsageError):
    """A server table that cannot be used as written (exit 2)."""


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None
    url: str | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    enabled: bool = True
    tools: tuple[str, ...] | None = None
    startup_timeout_sec: float = DEFAULT_STARTUP_TIMEOUT
    tool_timeout_sec: float = DEFAULT_TOOL_TIMEOUT
    trust_read_only: bool = False
    sources: tuple[str, ...] = ()  # the config files its keys came from

    @property
    def transport(self) -> str:
        return "http" if self.url else "stdio"

    def target(self) -> str:
        """What it runs or where it connects, for listings (no env, no headers: those hold keys)."""
        if self.url:
            return self.url
        return " ".join([self.command or "", *self.args]).strip()

    def resolved_env(self, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        return {key: _expand(value, environ, f"env {key}", self.name) for key, value in self.env.items()}

    def resolved_headers(self, environ: Mapping[str, str] = os.environ) -> dict[str, str]:
        return {key: _expand(value, environ, f"header {key}", self.name) for key, value in self.headers.items()}

    def working_dir(self, repo_root: Path) -> Path:
        return (repo_root / Path(self.cwd).expanduser()).resolve() if self.cwd else repo_root

    def secret_values(self, environ: Mapping[str, str] = os.environ) -> list[str]:
        """Values to mask wherever glmcode shows or saves text: header values, credential-named
        env entries, and whatever a ${VAR} reference brought in."""
        candidates = [_expand_quietly(value, environ) for value in self.headers.values()]
        candidates += [_expand_quietly(value, environ) for key, value in self.env.items() if _SECRET_NAME.search(key)]
        for value in [*self.env.values(), *self.headers.values()]:
            candidates += [environ.get(name, "") for name in _VARIABLE.findall(value)]
        for value in list(candidates):
            scheme, _, token = value.partition(" ")  # "Bearer abc...": the token alone too
            if token and scheme.isalpha():
                candidates.append(token)
        return [value for value in dict.fromkeys(candidates) if len(value) >= MIN_SECRET_LENGTH]

    def shown_env(self) -> dict[str, str]:
        """`env` for listings: credential-named values and ${VAR} references only as (set)."""
        return {key: "(set)" if _SECRET_NAME.search(key) and not _VARIABLE.fullmatch(value) else value
                for key, value in self.env.items()}


def _expand(value: str, environ: Mapping[str, str], what: str, server: str) -> str:
    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name not in environ:
            raise McpConfigError(f"MCP server '{server}': {what} uses ${{{name}}}, which is not set")
        return environ[name]

    return _VARIABLE.sub(replace, value)


def _expand_quietly(value: str, environ: Mapping[str, str]) -> str:
    return _VARIABLE.sub(lambda match: environ.get(match.group(1), ""), value)


# --- reading the tables ---------------------------------------------------------------------------

def merge_server_tables(merged: dict[str, dict[str, Any]], tables: Any, source: str) -> None:
    """Lay one config file's `mcp_servers` over `merged` (name -> key -> value, plus "_sources")."""
    if not isinstance(tables, dict):
        raise McpConfigError(f"mcp_servers in {source} must be a table of [mcp_servers.NAME] tables")
    for name, table in tables.items():
        if not isinstance(table, dict):
            raise McpConfigError(f"mcp_servers.{name} in {source} must be a table")
        entry = merged.setdefault(name, {"_sources": []})
        entry.update(table)
        entry["_sources"].append(source)


def parse_servers(merged: Mapping[str, Mapping[str, Any]]) -> dict[str, McpServerConfig]:
    return {name: parse_server(name, table) for name, table in merged.items()}


def parse_server(name: str, table: Mapping[str, Any]) -> McpServerConfig:
    sources = tuple(table.get("_sources", ()))
    where = f"mcp_servers.{name}" + (f" in {', '.join(sources)}" if sources else "")

    def invalid(problem: str) -> McpConfigError:
        return McpConfigError(f"{where}: {problem}")

    if not NAME.match(name):
        raise invalid("a server name may use only letters, digits, '-' and '_'")
    values = {key: value for key, value in table.items() if key != "_sources"}
    unknown = sorted(set(values) - set(_KEYS))
    if unknown:
        raise invalid(f"unknown key '{unknown[0]}' (known: {', '.join(_KEYS)})")
    enabled = _boolean(values.get("enabled", True), "enabled", invalid)
    command, url = values.get("command"), values.get("url")
    if command is not None and url is not None:
        raise invalid("give either command (stdio) or url (HTTP), not both")
    if command is None and url is None:
        if enabled:
            raise invalid("needs command (a stdio server) or url (an HTTP server)")
    elif command is not None and not (isinstance(command, str) and command.strip()):
        raise invalid("command must be a non-empty string")
    elif url is not None and not (isinstance(url, str) and re.match(r"https?://", url)):
        raise invalid("url must be an http:// or https:// address")
    if url is not None and ("args" in values or "env" in values or "cwd" in values):
        raise invalid("args, env and cwd are for stdio servers; an HTTP server takes url and headers")
    if command is not None and "headers" in values:
        raise invalid("headers are for HTTP servers; a stdio server takes env")
    tools = values.get("tools")
    return McpServerConfig(
        name=name,
        command=command.strip() if isinstance(command, str) else None,
        args=tuple(_strings(values.get("args", []), "args", invalid)),
        env=_string_table(values.get("env", {}), "env", invalid),
        cwd=_optional_string(values.get("cwd"), "cwd", invalid),
        url=url,
        headers=_string_table(values.get("headers", {}), "headers", invalid),
        enabled=enabled,
        tools=None if tools is None else tuple(_strings(tools, "tools", invalid)),
        startup_timeout_sec=_seconds(values.get("startup_timeout_sec", DEFAULT_STARTUP_TIMEOUT),
                                     "startup_timeout_sec", invalid),
        tool_timeout_sec=_seconds(values.get("tool_timeout_sec", DEFAULT_TOOL_TIMEOUT), "tool_timeout_sec", invalid),
        trust_read_only=_boolean(values.get("trust_read_only", False), "trust_read_only", invalid),
        sources=sources,
    )


def _boolean(value: Any, key: str, invalid: Any) -> bool:
    if not isinstance(value, bool):
        raise invalid(f"{key} must be true or false")
    return value


def _strings(value: Any, key: str, invalid: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise invalid(f"{key} must be a list of strings")
    return list(value)


def _string_table(value: Any, key: str, invalid: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(isinstance(item, str) for item in value.values()):
        raise invalid(f"{key} must be a table of strings, e.g. {key} = {{ NAME = \"value\" }}")
    return dict(value)


def _optional_string(value: Any, key: str, invalid: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"{key} must be a non-empty string")
    return value


def _seconds(value: Any, key: str, invalid: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise invalid(f"{key} must be a number of seconds above zero")
    return float(value)
