"""`glmcode acp`: glmcode as an Agent Client Protocol agent on stdio, for Zed and other editors.

The official `agent-client-protocol` library speaks the protocol; this module maps it onto
glmcode's agent:

- a session (`session/new`, `session/load`) is a glmcode session in the client's working
  directory: its settings, its MCP servers (the configured ones and those the client passes),
  its saved conversation;
- a prompt runs the agent on a worker thread; thinking and answer stream back as thought and
  message chunks, each tool call as a tool call whose edits carry their whole-file diff;
- approval asks the client (`session/request_permission`: allow, always, reject); the session
  modes are glmcode's approval modes (`plan`, `ask`, `auto-edit`, `yolo`);
- `session/cancel` stops the run at the next token, answers a pending permission request with a
  refusal and cancels MCP calls in flight; the prompt then ends with `cancelled`;
- `/NAME args` runs a custom command (glmcode.custom_commands), advertised to the client.

stdout carries the protocol, so nothing else may print there: warnings go to stderr.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import re
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import acp
from acp import RequestError, update_agent_message_text, update_agent_thought_text, update_user_message_text
from acp.helpers import update_available_commands
from acp.schema import (
    AgentCapabilities,
    AvailableCommand,
    AvailableCommandInput,
    Implementation,
    InitializeResponse,
    LoadSessionResponse,
    McpCapabilities,
    NewSessionResponse,
    PermissionOption,
    PromptCapabilities,
    PromptResponse,
    SessionMode,
    SessionModeState,
    ToolCallUpdate,
    UnstructuredCommandInput,
)

from glmcode import __version__
from glmcode.acp.updates import output_content, planned_diff, prompt_text, tool_kind, tool_locations, tool_title
from glmcode.custom_commands import load_commands
from glmcode.errors import GlmcodeError
from glmcode.mcp.config import McpServerConfig, parse_server
from glmcode.options import APPROVAL_MODES, ApprovalMode
from glmcode.settings import Settings, data_home, find_repo, load_settings

_MODE_DESCRIPTIONS = {
    ApprovalMode.PLAN.value: "Read-only: investigate and plan; nothing is changed or run",
    ApprovalMode.ASK.value: "Ask before every edit and every command",
    ApprovalMode.AUTO_EDIT.value: "Edit files freely, ask before commands",
    ApprovalMode.YOLO.value: "Ask nothing (deny rules still apply)",
}
_ALLOW, _ALWAYS, _REJECT = "allow", "always", "reject"
_OPTIONS = [
    PermissionOption(option_id=_ALLOW, name="Allow", kind="allow_once"),
    PermissionOption(option_id=_ALWAYS, name="Always allow in this session", kind="allow_always"),
    PermissionOption(option_id=_REJECT, name="Reject", kind="reject_once"),
]
_STOP_REASONS = {"done": "end_turn", "cancelled": "cancelled", "limit": "max_turn_requests"}
_SEND_TIMEOUT = 60.0  # seconds to hand one update to the client before giving the run up


def warn(text: str) -> None:
    print(f"glmcode acp: {text}", file=sys.stderr, flush=True)


@dataclass
class AcpSession:
    """One client session: a glmcode agent with its approver, MCP servers and cancel switch."""

    id: str
    repo: Path
    settings: Settings
    conn: Any
    loop: asyncio.AbstractEventLoop
    parts: Any = None  # launch.AgentParts
    servers: Any = None  # mcp.client.McpServers
    cancel: threading.Event = field(default_factory=threading.Event)
    notes: list[str] = field(default_factory=list)  # shown at the next prompt (e.g. MCP start failures)
    _always: set[tuple[str, ...]] = field(default_factory=set)
    _permission: concurrent.futures.Future[Any] | None = None
    _current_call: str = ""
    _diffs: dict[str, Any] = field(default_factory=dict)

    # -- the worker thread's side ----------------------------------------------------------------

    def run(self, text: str) -> Any:
        for note in self.notes:
            self._send(update_agent_thought_text(f"{note}\n"))
        self.notes.clear()
        return self.parts.agent.run(text, cancel=self.cancel)

    def on_event(self, event: Any) -> None:
        kind = type(event).__name__
        if kind == "ReasoningDelta":
            self._send(update_agent_thought_text(event.text))
        elif kind == "ContentDelta":
            self._send(update_agent_message_text(event.text))
        elif kind == "Notice":
            self._send(update_agent_thought_text(f"\n[{event.message}]\n"))
        elif kind == "ToolStarted":
            self._tool_started(event)
        elif kind == "ToolFinished":
            self._tool_finished(event)

    def _tool_started(self, event: Any) -> None:
        self._current_call = event.call_id
        diff = planned_diff(self.parts.workspace, event.name, event.arguments)
        if diff is not None:
            self._diffs[event.call_id] = diff
        self._send(acp.start_tool_call(
            event.call_id, tool_title(event.name, event.arguments), kind=tool_kind(event.name), status="pending",
            content=[diff] if diff is not None else None, locations=tool_locations(self.repo, event.arguments),
            raw_input=event.arguments))

    def _tool_finished(self, event: Any) -> None:
        result = event.result
        diff = self._diffs.pop(event.call_id, None)
        content = [diff] if diff is not None and not result.is_error else [output_content(result.output)]
        self._send(acp.update_tool_call(
            event.call_id, status="failed" if result.is_error else "completed", content=content,
            raw_output={"output": result.output, "is_error": result.is_error, "denied": event.denied}))

    def ask(self, request: Any) -> bool:
        """The approver's question, put to the client; a cancelled run or a lost client says no."""
        key = (request.tool_name, str(request.arguments.get("command", "")))
        if key in self._always:
            return self._approved()
        diff = self._diffs.get(self._current_call)
        content = [diff] if diff is not None else ([output_content(request.preview)] if request.preview else None)
        tool_call = ToolCallUpdate(tool_call_id=self._current_call, kind=tool_kind(request.tool_name),
                                   title=tool_title(request.tool_name, request.arguments), status="pending",
                                   content=content, raw_input=request.arguments)
        if self.cancel.is_set():
            return False
        self._permission = asyncio.run_coroutine_threadsafe(
            self.conn.request_permission(session_id=self.id, tool_call=tool_call, options=_OPTIONS), self.loop)
        try:
            response = self._permission.result()
        except (concurrent.futures.CancelledError, Exception):  # cancelled, or the client went away
            return False
        finally:
            self._permission = None
        outcome = response.outcome
        if outcome.outcome != "selected":  # the client cancelled the turn
            self.cancel.set()
            return False
        if outcome.option_id == _ALWAYS:
            self._always.add(key)
        return self._approved() if outcome.option_id in (_ALLOW, _ALWAYS) else False

    def _approved(self) -> bool:
        self._send(acp.update_tool_call(self._current_call, status="in_progress"))
        return True

    def _send(self, update: Any) -> None:
        sent = self.conn.session_update(session_id=self.id, update=update)
        future = asyncio.run_coroutine_threadsafe(sent, self.loop)
        try:
            future.result(timeout=_SEND_TIMEOUT)
        except Exception as error:  # noqa: BLE001 - the client is gone: stop working for it
            warn(f"cannot reach the client ({type(error).__name__}); stopping the run")
            self.cancel.set()

    # -- the event loop's side -------------------------------------------------------------------

    def stop_run(self) -> None:
        self.cancel.set()
        if self._permission is not None:
            self._permission.cancel()
        if self.servers is not None:
            self.servers.interrupt()

    def modes(self) -> SessionModeState:
        return SessionModeState(current_mode_id=self.parts.approver.mode.value, available_modes=[
            SessionMode(id=mode, name=mode, description=_MODE_DESCRIPTIONS[mode]) for mode in APPROVAL_MODES])

    def close(self) -> None:
        if self.servers is not None:
            self.servers.close()


class GlmcodeAcpAgent:
    """The ACP agent: one backend for the process, any number of sessions."""

    def __init__(self, overrides: dict[str, Any], *, replay: Path | None = None, yes: bool = False) -> None:
        self.overrides = overrides
        self.replay = replay
        self.yes = yes
        self.conn: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.sessions: dict[str, AcpSession] = {}
        self._backend: Any = None
        self._backend_lock = threading.Lock()
        self._run_lock = asyncio.Lock()  # one backend: one prompt at a time
        self._tasks: set[asyncio.Task[None]] = set()

    def on_connect(self, conn: Any) -> None:
        """Called by the library as the connection is made, on the event loop."""
        self.conn = conn
        self.loop = asyncio.get_running_loop()

    async def initialize(self, protocol_version: int, client_capabilities: Any = None, client_info: Any = None,
                         **kwargs: Any) -> InitializeResponse:
        return InitializeResponse(
            protocol_version=acp.PROTOCOL_VERSION,
            agent_capabilities=AgentCapabilities(
                load_session=True,
                prompt_capabilities=PromptCapabilities(embedded_context=True, image=False, audio=False),
                mcp_capabilities=McpCapabilities(http=True, sse=False)),
            agent_info=Implementation(name="glmcode", title="glmcode (GLM-4.7-Flash)", version=__version__),
            auth_methods=[])

    async def authenticate(self, method_id: str, **kwargs: Any) -> None:
        return None

    async def new_session(self, cwd: str, mcp_servers: list[Any] | None = None, **kwargs: Any) -> NewSessionResponse:
        session = await self._open(cwd, mcp_servers or [], resume=None)
        return NewSessionResponse(session_id=session.id, modes=session.modes())

    async def load_session(self, cwd: str, session_id: str, mcp_servers: list[Any] | None = None,
                           **kwargs: Any) -> LoadSessionResponse:
        session = await self._open(cwd, mcp_servers or [], resume=session_id)
        await self._replay_history(session)
        return LoadSessionResponse(modes=session.modes())

    async def set_session_mode(self, session_id: str, mode_id: str, **kwargs: Any) -> None:
        if mode_id not in APPROVAL_MODES:
            raise RequestError.invalid_params({"mode_id": mode_id, "expected": list(APPROVAL_MODES)})
        from glmcode.launch import sandbox_for_mode

        session = self._session(session_id)
        session.parts.approver.mode = ApprovalMode(mode_id)
        sandbox = sandbox_for_mode(session.settings, session.repo, mode_id, unattended=self.yes)
        if sandbox is not None:
            session.parts.workspace.sandbox = sandbox
        return None

    async def prompt(self, session_id: str, prompt: list[Any], **kwargs: Any) -> PromptResponse:
        session = self._session(session_id)
        text = self._expand_command(session, prompt_text(prompt))
        async with self._run_lock:
            session.cancel = threading.Event()
            result = await asyncio.to_thread(session.run, text)
        if result.status == "error":
            raise RequestError(-32603, result.error or "the run failed")
        if result.status == "limit" and "token" in (result.error or ""):
            return PromptResponse(stop_reason="max_tokens")
        return PromptResponse(stop_reason=_STOP_REASONS.get(result.status, "end_turn"))

    async def cancel(self, session_id: str, **kwargs: Any) -> None:
        session = self.sessions.get(session_id)
        if session is not None:
            session.stop_run()

    def close(self) -> None:
        for session in list(self.sessions.values()):
            session.stop_run()
            session.close()
        self.sessions.clear()
        if self._backend is not None:
            self._backend.close()

    # -- sessions --------------------------------------------------------------------------------

    def _session(self, session_id: str) -> AcpSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise RequestError.invalid_params({"session_id": session_id, "problem": "no such session"})
        return session

    async def _open(self, cwd: str, client_servers: list[Any], *, resume: str | None) -> AcpSession:
        try:
            session = await asyncio.to_thread(self._build, Path(cwd), client_servers, resume)
        except GlmcodeError as error:
            warn(str(error))
            raise RequestError(-32603, str(error)) from None
        self.sessions[session.id] = session
        # After the response, so the client knows the session the update is for.
        self._tasks.add(task := asyncio.create_task(self._announce_commands(session)))
        task.add_done_callback(self._tasks.discard)
        return session

    def _build(self, cwd: Path, client_servers: list[Any], resume: str | None) -> AcpSession:
        """Settings, backend, MCP servers and agent for one session (blocking: runs off the loop)."""
        from glmcode.launch import build_agent, command_sandbox, open_session
        from glmcode.mcp.client import McpServers

        repo = find_repo(cwd)
        settings = load_settings(repo, self.overrides)
        backend = self._open_backend(settings)
        log = open_session(settings, repo, resume=resume, meta={"command": "acp"})
        session = AcpSession(log.id, repo, settings, self.conn, self.loop)
        configs = {**settings.mcp_servers, **{c.name: c for c in _client_servers(client_servers)}}
        session.servers = McpServers(configs.values(), repo, log_dir=data_home() / "logs")
        for state in session.servers.start():
            if not state.running:
                session.notes.append(f"MCP server '{state.name}' did not start: {state.error}")
                warn(session.notes[-1])
        ask = (lambda request: True) if self.yes else session.ask
        sandbox = command_sandbox(settings, repo, unattended=self.yes)
        session.parts = build_agent(settings, backend, repo, read_only=False, ask=ask, on_event=session.on_event,
                                    session=log, sandbox=sandbox, mcp=session.servers)
        if sandbox.unavailable is not None:
            session.notes.append(f"commands will be refused: {sandbox.unavailable}")
        return session

    def _open_backend(self, settings: Settings) -> Any:
        from glmcode.launch import open_backend

        with self._backend_lock:
            if self._backend is None:
                self._backend = open_backend(settings, replay=self.replay, show_progress=False)
            return self._backend

    async def _announce_commands(self, session: AcpSession) -> None:
        await asyncio.sleep(0.05)
        commands = load_commands(session.repo).commands.values()
        available = [AvailableCommand(name=command.name, description=command.description or command.name,
                                      input=AvailableCommandInput(UnstructuredCommandInput(hint=command.argument_hint))
                                      if command.argument_hint else None) for command in commands]
        if available:
            await self.conn.session_update(session_id=session.id, update=update_available_commands(available))

    def _expand_command(self, session: AcpSession, text: str) -> str:
        if not text.startswith("/"):
            return text
        name, _, arguments = text[1:].partition(" ")
        command = load_commands(session.repo).get(name)
        return command.render(arguments) if command is not None else text

    async def _replay_history(self, session: AcpSession) -> None:
        """A loaded session's conversation, sent to the client as it would have streamed."""
        send = lambda update: self.conn.session_update(session_id=session.id, update=update)  # noqa: E731
        for message in session.parts.agent.messages:
            role = message.get("role")
            if role == "user":
                await send(update_user_message_text(str(message.get("content") or "")))
            elif role == "assistant":
                if message.get("reasoning_content"):
                    await send(update_agent_thought_text(message["reasoning_content"]))
                if message.get("content"):
                    await send(update_agent_message_text(message["content"]))
                for call in message.get("tool_calls") or []:
                    function = call.get("function", {})
                    arguments = _arguments(function.get("arguments"))
                    await send(acp.start_tool_call(call.get("id", ""), tool_title(function.get("name", ""), arguments),
                                                   kind=tool_kind(function.get("name", "")), status="completed",
                                                   raw_input=arguments))
            elif role == "tool":
                await send(acp.update_tool_call(message.get("tool_call_id", ""), status="completed",
                                                content=[output_content(str(message.get("content") or ""))]))


def _arguments(value: Any) -> dict[str, Any]:
    """A saved tool call's arguments: a dict, or the JSON text of one."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return {}
    return value if isinstance(value, dict) else {}


def _client_servers(servers: list[Any]) -> list[McpServerConfig]:
    """The MCP servers an editor passes in session/new, as glmcode server configs."""
    configs = []
    for server in servers:
        name = re.sub(r"[^A-Za-z0-9_-]", "_", server.name) or "server"
        if getattr(server, "url", None):
            table: dict[str, Any] = {"url": server.url, "headers": {h.name: h.value for h in server.headers or []}}
        else:
            table = {"command": server.command, "args": list(server.args or []),
                     "env": {v.name: v.value for v in server.env or []}}
        try:
            configs.append(parse_server(name, table))
        except GlmcodeError as error:
            warn(f"the client's MCP server '{server.name}' is left out: {error}")
    return configs


async def serve(agent: GlmcodeAcpAgent) -> None:
    """Run the agent on stdin/stdout until the client closes the connection."""
    try:
        await acp.run_agent(agent)
    finally:
        await asyncio.to_thread(agent.close)
