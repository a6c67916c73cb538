"""From settings to a ready agent: pick and open the backend, build the agent around it.

`glmcode.run` (one request: `ask`, `fix`, `run`), `glmcode.repl` (`chat`) and `glmcode.acp` share
this wiring: the backend, the session's MCP servers, and the agent with its tools.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from glmcode.backends.base import Backend
from glmcode.errors import BackendUnavailable, Interrupted, UsageError
from glmcode.options import SANDBOX_OFF, SANDBOX_WORKSPACE_WRITE, ApprovalMode
from glmcode.sandbox import Sandbox, make_policy, open_sandbox
from glmcode.settings import Settings, config_home, data_home
from glmcode.weights import require_checkpoint

if TYPE_CHECKING:
    from glmcode.agent.approval import ApprovalRequest, Approver
    from glmcode.agent.events import AnyEvent
    from glmcode.agent.loop import Agent
    from glmcode.agent.session import SessionLog
    from glmcode.engine import LLM
    from glmcode.mcp.client import McpServers
    from glmcode.tools.base import Tool
    from glmcode.tools.workspace import Workspace


def resolve_device(device: str) -> str:
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


# --- backends ------------------------------------------------------------------------------------

def load_replay_script(path: Path) -> list[str]:
    """A replay script: a JSON list of raw GLM-format completions, one per model call."""
    try:
        script = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"cannot read replay script {path}: {error.strerror}") from None
    except ValueError as error:
        raise UsageError(f"replay script {path} is not JSON: {error}") from None
    if not isinstance(script, list) or not all(isinstance(step, str) for step in script):
        raise UsageError(f"replay script {path} must be a JSON list of strings")
    return script


def open_backend(settings: Settings, *, replay: Path | None = None, show_progress: bool = False) -> Backend:
    """The backend the settings ask for: a replay script (tests), the remote API, or local weights.

    `context_tokens` caps the context window the agent plans with (and compacts against).
    """
    backend = _open_backend(settings, replay, show_progress)
    if settings.context_tokens is not None and settings.context_tokens < backend.context_window:
        backend.context_window = settings.context_tokens
    return backend


def _open_backend(settings: Settings, replay: Path | None, show_progress: bool) -> Backend:
    if replay is not None:
        from glmcode.backends.replay import ReplayBackend

        return ReplayBackend(load_replay_script(replay))
    if settings.remote is not None:
        from glmcode.backends.remote import RemoteBackend, resolve_endpoint

        endpoint = resolve_endpoint(settings.remote, api_key=settings.api_key)
        return RemoteBackend(endpoint, model=settings.remote_model)
    if settings.attach_server:
        from glmcode.server.attach import attach

        served = attach(settings)
        if served is not None:
            return served
    return _open_local(settings, show_progress)


def _open_local(settings: Settings, show_progress: bool) -> Backend:
    from glmcode.backends.local import LocalBackend

    return LocalBackend(load_engine(settings, show_progress))


def load_engine(settings: Settings, show_progress: bool, **engine_options: Any) -> LLM:
    """The local engine the settings describe (`chat`, `ask`, `fix` in-process, and `serve`)."""
    model_dir = require_checkpoint(settings)
    try:
        from glmcode.engine import LLM
    except ImportError as error:
        raise BackendUnavailable(f"the local engine cannot be imported ({error}); use --remote") from None
    try:
        return LLM(
            str(model_dir),
            device=resolve_device(settings.device),
            dtype=settings.dtype,
            quantization=settings.quantization,
            kv_cache_memory=settings.kv_cache_memory,
            kv_cache_dtype=settings.kv_cache_dtype,
            disk_cache_dir=settings.kv_cache_path(),
            disk_cache_budget=settings.kv_cache_disk_budget,
            weights_cache_dir=settings.weights_cache_path(),
            progress=show_progress,
            **engine_options,
        )
    except KeyboardInterrupt:
        raise Interrupted("interrupted while loading the model") from None


def backend_label(settings: Settings, replay: Path | None, backend: Backend | None = None) -> str:
    """"replay", "local", "remote:SPEC", or "server:URL" for a running `glmcode serve` in use."""
    if replay is not None:
        return "replay"
    if getattr(backend, "label", None):
        return backend.label
    return f"remote:{settings.remote}" if settings.remote is not None else "local"


def model_label(settings: Settings, replay: Path | None) -> str:
    if replay is not None:
        return "replay"
    if settings.remote is not None:
        return settings.remote_model
    return settings.model_dir().name


# --- the agent -----------------------------------------------------------------------------------

@dataclass
class AgentParts:
    """What one command builds around the backend; the REPL keeps these for slash commands."""

    agent: Agent
    approver: Approver
    workspace: Workspace
    session: SessionLog
    tools: list[Tool]


def build_agent(
    settings: Settings,
    backend: Backend,
    repo: Path,
    *,
    read_only: bool,
    ask: Callable[[ApprovalRequest], bool] | None,
    on_event: Callable[[AnyEvent], None],
    session: SessionLog,
    sandbox: Sandbox,
    mcp: McpServers | None = None,
) -> AgentParts:
    from glmcode.agent.approval import Approver, CommandRules
    from glmcode.agent.loop import Agent, AgentConfig
    from glmcode.backends.base import Sampling, Thinking
    from glmcode.tools.registry import all_tools, read_only_tools
    from glmcode.tools.workspace import Workspace

    workspace = Workspace(repo, test_command=settings.test_command, sandbox=sandbox)
    mode = ApprovalMode("plan" if read_only else settings.approval)
    approver = Approver(mode, CommandRules(allow=settings.allow_commands, deny=settings.deny_commands), ask=ask)
    config = AgentConfig(
        secrets=(*secrets_of(settings), *(mcp.secret_values() if mcp else ())),
        max_turns=settings.max_turns,
        thinking=Thinking(enabled=settings.thinking),
        sampling=Sampling(temperature=settings.temperature, top_p=settings.top_p,
                          max_tokens=settings.max_output_tokens),
    )
    tools = read_only_tools() if read_only else all_tools()
    if mcp is not None:
        from glmcode.mcp.tools import mcp_tools

        tools += [tool for tool in mcp_tools(mcp) if tool.kind == "read" or not read_only]
    agent = Agent(backend, workspace, approver, config, session=session, tools=tools, on_event=on_event)
    return AgentParts(agent, approver, workspace, session, tools)


def command_sandbox(settings: Settings, repo: Path, *, unattended: bool) -> Sandbox:
    """The OS sandbox for the commands the agent runs (glmcode.sandbox).

    The `sandbox` setting when given; otherwise workspace-write wherever commands run without
    anyone seeing them first (`unattended`: `fix`, `--yes`; and yolo mode), off where a person
    approves each one. Credentials under the home directory and glmcode's own config and data
    (API key, sessions, history) are hidden, plus the `sandbox_hidden` paths."""
    mode = settings.sandbox
    if mode is None:
        unasked = unattended or settings.approval == ApprovalMode.YOLO.value
        mode = SANDBOX_WORKSPACE_WRITE if unasked else SANDBOX_OFF
    policy = make_policy(mode, repo, network=settings.sandbox_network, home=Path.home(),
                         own_dirs=(config_home(), data_home(), settings.sessions_path()),
                         extra_hidden=settings.sandbox_hidden)
    return open_sandbox(policy)


def sandbox_for_mode(settings: Settings, repo: Path, mode: str, *, unattended: bool) -> Sandbox | None:
    """The sandbox approval `mode` implies when the mode changes mid-session (yolo runs commands
    unasked), or None when the `sandbox` setting fixes it."""
    if settings.sandbox is not None:
        return None
    return command_sandbox(replace(settings, approval=mode), repo, unattended=unattended)


def start_mcp_servers(settings: Settings, repo: Path, *, read_only: bool = False,
                      show_progress: bool = False) -> McpServers:
    """The session's MCP servers, started in parallel (a spinner on stderr meanwhile, when it is a
    terminal). A read-only run starts only the servers whose read-only tools it may use."""
    from glmcode.mcp.client import McpServers
    from glmcode.mcp.manage import start_with_spinner

    configs = [config for config in settings.mcp_servers.values() if config.trust_read_only or not read_only]
    servers = McpServers(configs, repo, log_dir=data_home() / "logs")
    try:
        start_with_spinner(servers, show_progress)
    except BaseException:  # Ctrl-C while they start: stop the ones already up
        servers.close()
        raise
    return servers


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The API keys to keep out of everything shown or saved: the environment's and the config's."""
    from glmcode.agent.session import known_secrets

    config_key = settings.api_key if settings.api_key and len(settings.api_key) >= 8 else None
    return (*known_secrets(), *([config_key] if config_key else []))


def open_session(settings: Settings, repo: Path, *, resume: str | None, meta: dict[str, Any]) -> SessionLog:
    """The session `--resume ID` / `--continue` ("last") names, or a new one, saved once the model replies."""
    from glmcode.agent.session import SessionStore

    store = SessionStore(settings.sessions_path())
    if resume is not None:
        return store.open(resume, repo=str(repo) if resume == "last" else None)
    return store.create({"repo": str(repo), **meta}, deferred=True)
