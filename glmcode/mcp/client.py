"""Connections to the configured MCP servers, alive from the session's start to its end.

The agent is synchronous and the MCP SDK is asynchronous, so `McpServers` runs one asyncio loop
on a thread of its own. Each server lives in one task there, inside `async with Client(...)`,
from `start()` to `close()`: the SDK's stdio transport starts the server in a process group of
its own and, on the way out, closes its stdin, then terminates and kills that group. Each stdio
server runs under glmcode/mcp/reaper.py, which also ends what the server itself started, and
the server if glmcode dies. The agent's thread submits tool calls to the loop and waits.

Failures never raise out of here: a server that cannot start is left out (`failed()` says why),
and a call that times out, or whose server dies under it, is an error result the model reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import math
import os
import shutil
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from glmcode.mcp.config import McpConfigError, McpServerConfig
from glmcode.mcp.results import format_result
from glmcode.tools.base import ToolResult

# Each stdio server runs under this script, which ends everything the server started (see it).
_REAPER = Path(__file__).with_name("reaper.py")
_STOP_GRACE = 8.0  # the SDK's shutdown: 2 s for stdin EOF, 2 s after SIGTERM, 2 s to reap a kill


@dataclass(frozen=True)
class McpTool:
    server: str
    name: str  # the server's own name for it
    description: str
    input_schema: dict[str, Any]
    read_only: bool  # the server's readOnlyHint


@dataclass
class ServerState:
    config: McpServerConfig
    log_path: Path | None = None
    tools: list[McpTool] = field(default_factory=list)
    server_version: str = ""
    error: str | None = None  # why it did not start, or why it stopped
    http_error: str | None = None  # the last HTTP error status an HTTP server answered with
    client: Any = None  # the connected mcp.Client while it runs
    ready: threading.Event = field(default_factory=threading.Event)  # started or failed
    stop: asyncio.Event | None = None
    task: concurrent.futures.Future[None] | None = None

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def running(self) -> bool:
        return self.client is not None


class McpServers:
    """Start the enabled servers in parallel, expose their tools, call them, stop them."""

    def __init__(self, configs: Iterable[McpServerConfig], repo_root: Path, *, log_dir: Path | None = None,
                 environ: Mapping[str, str] | None = None) -> None:
        self.repo_root = Path(repo_root)
        self.log_dir = log_dir
        self.environ = dict(os.environ if environ is None else environ)
        self.states = {config.name: ServerState(config) for config in configs if config.enabled}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._calls: set[concurrent.futures.Future[ToolResult]] = set()

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self, on_ready: Callable[[ServerState], None] | None = None) -> list[ServerState]:
        """Start every server at once; return when each is up or has failed (its own timeout)."""
        if not self.states:
            return []
        if self._loop is None:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="glmcode-mcp", daemon=True)
            self._thread.start()
        for state in self.states.values():
            state.task = asyncio.run_coroutine_threadsafe(self._serve(state), self._loop)
        pending = list(self.states.values())
        while pending:  # short waits so Ctrl-C reaches the main thread
            for state in [s for s in pending if s.ready.wait(0.05)]:
                pending.remove(state)
                if on_ready:
                    on_ready(state)
        return list(self.states.values())

    def close(self) -> None:
        """Stop every server and wait (bounded) until their processes are gone."""
        loop = self._loop
        if loop is None:
            return
        self.interrupt()
        for state in self.states.values():
            if state.stop is not None:
                loop.call_soon_threadsafe(state.stop.set)
        deadline = time.monotonic() + _STOP_GRACE
        for state in self.states.values():
            if state.task is not None:
                try:
                    state.task.result(timeout=max(0.1, deadline - time.monotonic()))
                except concurrent.futures.TimeoutError:
                    state.task.cancel()
                except (concurrent.futures.CancelledError, Exception):
                    pass
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=_STOP_GRACE)
        if not loop.is_running():
            loop.close()
        self._loop = None

    def __enter__(self) -> McpServers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- what is there ---------------------------------------------------------------------------

    def running(self) -> list[ServerState]:
        return [state for state in self.states.values() if state.running]

    def failed(self) -> list[ServerState]:
        return [state for state in self.states.values() if state.ready.is_set() and not state.running]

    def warnings(self) -> list[str]:
        """One line per server that did not start."""
        return [f"MCP server '{state.name}' did not start: {state.error}" for state in self.failed()]

    def tools(self) -> list[McpTool]:
        return [tool for state in self.running() for tool in state.tools]

    def secret_values(self) -> list[str]:
        return [value for state in self.states.values() for value in state.config.secret_values(self.environ)]

    # -- calls -----------------------------------------------------------------------------------

    def call(self, server: str, tool: str, arguments: dict[str, Any]) -> ToolResult:
        """Call one tool and wait for it; never raises (Ctrl-C aside: it cancels the call)."""
        state = self.states.get(server)
        if state is None or self._loop is None or not state.running:
            why = state.error if state is not None and state.error else "it is not running"
            return ToolResult(f"Error: the MCP server '{server}' is unavailable: {why}.", is_error=True)
        future = asyncio.run_coroutine_threadsafe(self._call(state, tool, arguments), self._loop)
        self._calls.add(future)
        # The SDK's own read timeout ends the call first; this bounds a wedged transport too.
        deadline = time.monotonic() + state.config.tool_timeout_sec + 5
        try:
            while True:
                try:
                    return future.result(timeout=0.1)
                except concurrent.futures.TimeoutError:
                    if time.monotonic() > deadline:
                        future.cancel()
                        return _timed_out(state, tool)
                except concurrent.futures.CancelledError:
                    return ToolResult(f"Error: the call to {tool} was cancelled.", is_error=True)
        except KeyboardInterrupt:
            future.cancel()
            raise
        finally:
            self._calls.discard(future)

    def interrupt(self) -> None:
        """Cancel the calls in flight (the user stopped the run)."""
        for future in list(self._calls):
            future.cancel()

    # -- on the loop -----------------------------------------------------------------------------

    async def _serve(self, state: ServerState) -> None:
        import anyio
        from mcp import Client

        config = state.config
        state.stop = asyncio.Event()
        log = self._open_log(state)
        try:
            transport = self._transport(state, log)
            with anyio.CancelScope() as scope:
                scope.deadline = anyio.current_time() + config.startup_timeout_sec
                async with Client(transport, client_info=_client_info()) as client:
                    state.tools = await _list_tools(client, config)
                    state.server_version = getattr(client.server_info, "version", "") or ""
                    scope.deadline = math.inf
                    state.client = client
                    state.ready.set()
                    await state.stop.wait()
            if scope.cancelled_caught and not state.ready.is_set():
                state.error = f"it did not start within {config.startup_timeout_sec:g}s"
        except BaseException as error:  # noqa: BLE001 - every failure becomes a reason shown to the user
            state.error = _describe_failure(error, state, started=state.client is not None)
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise
        finally:
            state.client = None
            state.ready.set()
            if log is not None:
                log.close()

    def _transport(self, state: ServerState, log: Any) -> Any:
        config = state.config
        if config.url:
            return _http_transport(state, config.resolved_headers(self.environ))
        from mcp import StdioServerParameters
        from mcp.client.stdio import get_default_environment, stdio_client

        env = {**get_default_environment(), **config.resolved_env(self.environ)}
        cwd = config.working_dir(self.repo_root)
        command = config.command or ""
        if shutil.which(command, path=env.get("PATH")) is None and not (cwd / command).is_file():
            raise FileNotFoundError(command)
        parameters = StdioServerParameters(command=sys.executable, args=[str(_REAPER), command, *config.args],
                                           env=env, cwd=cwd)
        return stdio_client(parameters, errlog=log if log is not None else open(os.devnull, "w"))

    def _open_log(self, state: ServerState) -> Any:
        """The server's stderr goes to a log file (one per server, rewritten each session)."""
        if self.log_dir is None or state.config.url:
            return None
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            state.log_path = self.log_dir / f"mcp-{state.name}.log"
            return state.log_path.open("w", encoding="utf-8", errors="replace")
        except OSError:
            state.log_path = None
            return None

    async def _call(self, state: ServerState, tool: str, arguments: dict[str, Any]) -> ToolResult:
        from mcp import MCPError
        from mcp_types import CONNECTION_CLOSED, REQUEST_TIMEOUT

        client = state.client
        if client is None:
            return ToolResult(f"Error: the MCP server '{state.name}' is unavailable: {state.error}.", is_error=True)
        try:
            result = await client.call_tool(tool, arguments, read_timeout_seconds=state.config.tool_timeout_sec)
        except MCPError as error:
            if error.code == REQUEST_TIMEOUT:
                return _timed_out(state, tool)
            if error.code == CONNECTION_CLOSED:
                state.error = "it stopped during a call" + _last_words(state)
                state.client = None
                state.stop.set()
                return ToolResult(f"Error: the MCP server '{state.name}' died during the call to {tool}"
                                  f"{_last_words(state)}; its tools are unavailable now.", is_error=True)
            return ToolResult(f"Error: {tool} failed: {error}", is_error=True)
        except Exception as error:  # noqa: BLE001 - a malformed answer must not end the session
            return ToolResult(f"Error: {tool} failed: {type(error).__name__}: {_first_line(error)}", is_error=True)
        return format_result(result)


@contextlib.asynccontextmanager
async def _http_transport(state: ServerState, headers: dict[str, str]) -> AsyncIterator[Any]:
    import httpx2  # the MCP SDK's HTTP client
    from mcp.client.streamable_http import streamable_http_client

    async def note_refusal(response: Any) -> None:  # the SDK keeps the JSON-RPC error, not the status
        if response.status_code >= 400:
            state.http_error = f"HTTP {response.status_code} {response.reason_phrase}".strip()

    config = state.config
    timeout = httpx2.Timeout(config.startup_timeout_sec, read=max(config.tool_timeout_sec, 300.0))
    async with httpx2.AsyncClient(headers=headers, timeout=timeout,
                                  event_hooks={"response": [note_refusal]}) as http:
        async with streamable_http_client(config.url or "", http_client=http) as streams:
            yield streams


async def _list_tools(client: Any, config: McpServerConfig) -> list[McpTool]:
    tools: list[McpTool] = []
    cursor = None
    while True:
        page = await client.list_tools(cursor=cursor)
        for tool in page.tools:
            if config.tools is not None and tool.name not in config.tools:
                continue
            hints = tool.annotations
            tools.append(McpTool(config.name, tool.name, tool.description or tool.title or "",
                                 dict(tool.input_schema or {"type": "object", "properties": {}}),
                                 bool(hints and hints.read_only_hint)))
        cursor = page.next_cursor
        if not cursor:
            return tools


def _client_info() -> Any:
    from mcp_types import Implementation

    from glmcode import __version__

    return Implementation(name="glmcode", version=__version__)


def _timed_out(state: ServerState, tool: str) -> ToolResult:
    return ToolResult(f"Error: {tool} timed out after {state.config.tool_timeout_sec:g}s (MCP server "
                      f"'{state.name}' did not answer); it may still be running there.", is_error=True)


def _describe_failure(error: BaseException, state: ServerState, *, started: bool) -> str:
    """One line for why a server did not start or stopped."""
    error = _innermost(error)
    if isinstance(error, McpConfigError):
        return str(error).removeprefix(f"MCP server '{state.name}': ")
    if isinstance(error, FileNotFoundError):
        return f"command not found: {state.config.command}"
    if isinstance(error, PermissionError):
        return f"cannot run {state.config.command}: permission denied"
    if isinstance(error, (TimeoutError, asyncio.CancelledError)) and not started:
        return f"it did not start within {state.config.startup_timeout_sec:g}s"
    name = type(error).__name__
    text = _first_line(error)
    if state.http_error and not started:
        hint = ": check its headers (a missing or wrong key?)" if state.http_error[5:8] in ("401", "403") else ""
        return f"{state.config.url} answered {state.http_error}{hint}"
    if "Connection closed" in text:
        return ("it exited during startup" if not started else "it stopped") + _last_words(state)
    if name in ("ConnectError", "ConnectTimeout"):
        return f"cannot connect to {state.config.url} ({text})"
    return f"{name}: {text}" + _last_words(state)


def _innermost(error: BaseException) -> BaseException:
    while isinstance(error, BaseExceptionGroup) and error.exceptions:
        error = error.exceptions[0]
    return error


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _last_words(state: ServerState) -> str:
    """The last line the server wrote to stderr, and where the rest is."""
    path = state.log_path
    if path is None:
        return ""
    try:
        lines = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
    except OSError:
        return ""
    last = next((line for line in reversed(lines) if line), "")
    return f": {last[:200]} (its log: {path})" if last else ""
