"""What `glmcode mcp list|add|remove|test` and `glmcode doctor` do with the configured servers.

`add` and `remove` edit one config file (the user's, or the repository's `.glmcode.toml`) with
tomlkit, so its comments and layout stay as they were, and write it atomically. `test` starts
one server and lists its tools; `probe` starts them all, for doctor.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from glmcode.errors import BackendUnavailable, UsageError
from glmcode.mcp.config import McpServerConfig, parse_server
from glmcode.settings import Settings, data_home, repo_config_path, user_config_path


def config_file(scope: str, repo: Path) -> Path:
    if scope == "user":
        return user_config_path()
    if scope == "repo":
        return repo_config_path(repo)
    raise UsageError(f"--scope must be user or repo, not {scope!r}")


# --- list --------------------------------------------------------------------------------------------

def listing(settings: Settings) -> list[dict[str, Any]]:
    """One row per configured server, as `mcp list` shows it (no credentials)."""
    return [{
        "name": name,
        "transport": config.transport,
        "target": config.target(),
        "enabled": config.enabled,
        "tools": list(config.tools) if config.tools is not None else "all",
        "env": config.shown_env(),
        "headers": {key: "(set)" for key in config.headers},
        "trust_read_only": config.trust_read_only,
        "source": ", ".join(config.sources),
    } for name, config in settings.mcp_servers.items()]


# --- add / remove --------------------------------------------------------------------------------------

def add_server(path: Path, name: str, table: dict[str, Any], *, replace: bool = False) -> McpServerConfig:
    """Write [mcp_servers.NAME] into the file at `path` (validated first); the parsed config."""
    import tomlkit

    config = parse_server(name, {**table, "_sources": [str(path)]})
    document = _load(path)
    servers = document.setdefault("mcp_servers", tomlkit.table(is_super_table=True))
    if name in servers and not replace:
        raise UsageError(f"MCP server '{name}' is already in {path}; pass --replace to overwrite it, "
                         f"or `glmcode mcp remove {name}` first")
    entry = tomlkit.table()
    for key, value in table.items():
        entry[key] = _inline(value) if isinstance(value, dict) else value
    servers[name] = entry
    _write(path, tomlkit.dumps(document))
    return config


def remove_server(paths: list[Path], name: str) -> Path:
    """Delete [mcp_servers.NAME] from the one file among `paths` that declares it."""
    import tomlkit

    declaring = [path for path in paths if name in _load(path).get("mcp_servers", {})]
    if not declaring:
        raise UsageError(f"no MCP server '{name}' in {' or '.join(str(path) for path in paths)}")
    if len(declaring) > 1:
        raise UsageError(f"MCP server '{name}' is in {declaring[0]} and {declaring[1]}; "
                         "pass --scope user or --scope repo")
    path = declaring[0]
    document = _load(path)
    del document["mcp_servers"][name]
    if not document["mcp_servers"]:
        del document["mcp_servers"]
    _write(path, tomlkit.dumps(document))
    return path


def parse_pairs(pairs: list[str], what: str) -> dict[str, str]:
    """KEY=VALUE words (`--env`, `--header`) as a table."""
    table = {}
    for pair in pairs:
        key, equals, value = pair.partition("=")
        if not equals or not key.strip():
            raise UsageError(f"{what} takes KEY=VALUE, not {pair!r}")
        table[key.strip()] = value
    return table


def _load(path: Path) -> Any:
    import tomlkit

    try:
        return tomlkit.parse(path.read_text(encoding="utf-8")) if path.is_file() else tomlkit.document()
    except tomlkit.exceptions.ParseError as error:
        raise UsageError(f"{path} is not valid TOML: {error}") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def _inline(table: Mapping[str, Any]) -> Any:
    import tomlkit

    inline = tomlkit.inline_table()
    inline.update(table)
    return inline


def _write(path: Path, text: str) -> None:
    """Atomically, keeping the file's mode (a new file is private: it may name keys)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = path.stat().st_mode & 0o777 if path.exists() else 0o600
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


# --- starting them -----------------------------------------------------------------------------------

def test_server(settings: Settings, repo: Path, name: str, *, show_progress: bool) -> list[str]:
    """Start one server and describe it and its tools; BackendUnavailable if it does not start."""
    from dataclasses import replace

    from glmcode.mcp.client import McpServers

    config = settings.mcp_servers.get(name)
    if config is None:
        known = ", ".join(settings.mcp_servers) or "none"
        raise UsageError(f"no MCP server '{name}' is configured (configured: {known}); add one with "
                         "`glmcode mcp add`")
    started = time.monotonic()
    with McpServers([replace(config, enabled=True)], repo, log_dir=data_home() / "logs") as servers:
        start_with_spinner(servers, show_progress)
        state = servers.states[name]
        if not state.running:
            raise BackendUnavailable(f"MCP server '{name}' did not start: {state.error}")
        version = f" {state.server_version}" if state.server_version else ""
        lines = [f"✓ {name} ({config.transport}: {config.target()}){version}: started in "
                 f"{time.monotonic() - started:.1f}s, {len(state.tools)} tools"
                 + ("" if config.enabled else " (disabled in the config: sessions do not start it)")]
        for tool in state.tools:
            hint = " [read-only]" if tool.read_only else ""
            lines.append(f"  {tool.name}{hint}: {_first_line(tool.description)}")
        return lines


def probe(settings: Settings, repo: Path) -> list[tuple[str, bool, str]]:
    """(name, started, what) for every enabled server, started together: for doctor."""
    from glmcode.mcp.client import McpServers

    with McpServers(settings.mcp_servers.values(), repo, log_dir=data_home() / "logs") as servers:
        servers.start()
        return [(state.name, state.running, f"{len(state.tools)} tools" if state.running else state.error or "")
                for state in servers.states.values()]


def start_with_spinner(servers: Any, show_progress: bool) -> None:
    """Start the servers, with a spinner on stderr meanwhile when `show_progress`."""
    if not show_progress or not servers.states:
        servers.start()
        return
    from rich.console import Console

    names = ", ".join(servers.states)
    with Console(stderr=True).status(f"starting MCP server{'s' if len(servers.states) > 1 else ''} {names}…"):
        servers.start()


def _first_line(text: str) -> str:
    line = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return line if len(line) <= 100 else line[:97] + "..."
