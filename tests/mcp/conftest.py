"""Real MCP servers for the tests: the reference `mcp-server-git` and `mcp-server-time` from PyPI,
a misbehaving stdio server (flaky_server.py) and a streamable HTTP server built here with the SDK.

Every stdio server gets GLMCODE_TEST_MARKER=<unique> in its environment, so a test can list the
processes a session left behind (theirs and their children's) from /proc.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from glmcode.mcp.config import McpServerConfig, parse_server

FLAKY = Path(__file__).with_name("flaky_server.py")
TOKEN = "test-token-0123456789abcdef"


def processes_with(marker: str) -> list[int]:
    """Live processes whose environment carries this marker (zombies are not alive)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if f"GLMCODE_TEST_MARKER={marker}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(marker: str, timeout: float = 10.0) -> list[int]:
    """The marked processes still alive after up to `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while (left := processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def marker() -> Iterator[str]:
    value = uuid.uuid4().hex
    yield value
    for pid in processes_with(value):  # never leave one behind, even when a test fails
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, 9)


@pytest.fixture
def git_repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "notes.txt").write_text("first line\n")
    for command in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=Tess", "commit", "-qm", "Add the notes"]):
        subprocess.run(command, cwd=repo, check=True)
    (repo / "todo.txt").write_text("write the tests\n")
    return repo


def stdio(name: str, marker: str, *args: str, **table: Any) -> McpServerConfig:
    """A stdio server config running `python args...` with the test marker in its environment."""
    env = {"GLMCODE_TEST_MARKER": marker, **table.pop("env", {})}
    return parse_server(name, {"command": sys.executable, "args": list(args), "env": env, **table})


def git_server(marker: str, repo: Path, **table: Any) -> McpServerConfig:
    return stdio("git", marker, "-m", "mcp_server_git", "--repository", str(repo), **table)


def time_server(marker: str, **table: Any) -> McpServerConfig:
    return stdio("time", marker, "-m", "mcp_server_time", "--local-timezone", "UTC", **table)


def flaky_server(marker: str, name: str = "flaky", mode: str = "", **table: Any) -> McpServerConfig:
    return stdio(name, marker, str(FLAKY), *([mode] if mode else []), **table)


# --- a streamable HTTP server, written here with the SDK --------------------------------------------

def _notes_app() -> Any:
    from mcp.server.mcpserver import MCPServer

    server = MCPServer("notes")
    notes: dict[str, str] = {}

    @server.tool()
    def add_note(title: str, text: str) -> str:
        """Keep a note."""
        notes[title] = text
        return f"kept {title!r} ({len(notes)} notes)"

    @server.tool()
    def read_note(title: str) -> str:
        """Read a note back."""
        return notes.get(title, f"no note called {title!r}")

    app = server.streamable_http_app()

    async def require_token(scope: dict[str, Any], receive: Any, send: Any) -> None:
        headers = dict(scope.get("headers") or [])
        if scope["type"] == "http" and headers.get(b"authorization") != f"Bearer {TOKEN}".encode():
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"text/plain")]})
            await send({"type": "http.response.body", "body": b"missing or wrong token"})
            return
        await app(scope, receive, send)

    return require_token, app


@pytest.fixture
def http_server() -> Iterator[str]:
    """The notes server on 127.0.0.1 (a random port); yields its MCP URL. Wants `Bearer TOKEN`."""
    import uvicorn

    guarded, app = _notes_app()

    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await (app if scope["type"] == "lifespan" else guarded)(scope, receive, send)

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(asgi, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "the HTTP MCP server did not start"
    yield f"http://127.0.0.1:{port}/mcp"
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()
