"""From settings to a running agent: pick the backend, build the agent, run one request.

The CLI commands (`chat`, `ask`, `fix`) and the REPL share this wiring; each command only adds
its own prompt and what it does with the result. Exit codes for a finished run are decided here
(`exit_code_for`), next to where runs end.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from glmcode.errors import BackendUnavailable, GlmcodeError, Interrupted, UsageError
from glmcode.events import Usage
from glmcode.settings import Settings
from glmcode.weights import require_checkpoint

# RunResult.status -> process exit code. "tests_failed" is what `fix` reports on top.
EXIT_CODES = {"done": 0, "error": 1, "limit": 4, "tests_failed": 5, "cancelled": 130}


def exit_code_for(status: str, error: BaseException | None = None) -> int:
    """The exit code for a run that ended with `status`; a GlmcodeError brings its own code."""
    if status == "error" and isinstance(error, GlmcodeError):
        return error.exit_code
    return EXIT_CODES.get(status, 1)


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


def open_backend(settings: Settings, *, replay: Path | None = None, show_progress: bool = False) -> Any:
    """The backend the settings ask for: a replay script (tests), the remote API, or local weights.

    `context_tokens` caps the context window the agent plans with (and compacts against).
    """
    backend = _open_backend(settings, replay, show_progress)
    if settings.context_tokens is not None and settings.context_tokens < backend.context_window:
        backend.context_window = settings.context_tokens
    return backend


def _open_backend(settings: Settings, replay: Path | None, show_progress: bool) -> Any:
    if replay is not None:
        from glmcode.backends.replay import ReplayBackend

        return ReplayBackend(load_replay_script(replay))
    if settings.remote is not None:
        from glmcode.backends.remote import RemoteBackend, resolve_endpoint

        endpoint = resolve_endpoint(settings.remote, api_key=settings.api_key)
        return RemoteBackend(endpoint, model=settings.remote_model)
    return _open_local(settings, show_progress)


def _open_local(settings: Settings, show_progress: bool) -> Any:
    model_dir = require_checkpoint(settings)
    try:
        from glmcode.backends.local import LocalBackend
        from glmcode.engine import LLM
    except ImportError as error:
        raise BackendUnavailable(f"the local engine cannot be imported ({error}); use --remote") from None
    try:
        llm = LLM(
            str(model_dir),
            device=resolve_device(settings.device),
            dtype=settings.dtype,
            quantization=settings.quantization,
            kv_cache_memory=settings.kv_cache_memory,
            progress=show_progress,
        )
    except KeyboardInterrupt:
        raise Interrupted("interrupted while loading the model") from None
    return LocalBackend(llm)


def backend_label(settings: Settings, replay: Path | None) -> str:
    if replay is not None:
        return "replay"
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

    agent: Any
    approver: Any
    workspace: Any
    session: Any
    tools: list[Any]


def build_agent(
    settings: Settings,
    backend: Any,
    repo: Path,
    *,
    read_only: bool,
    ask: Callable[[Any], bool] | None,
    on_event: Callable[[Any], None],
    session: Any,
) -> AgentParts:
    from glmcode.agent.approval import ApprovalMode, Approver, CommandRules
    from glmcode.agent.loop import Agent, AgentConfig
    from glmcode.backends.base import Sampling, Thinking
    from glmcode.tools.registry import all_tools, read_only_tools
    from glmcode.tools.workspace import Workspace

    workspace = Workspace(repo, test_command=settings.test_command)
    mode = ApprovalMode("plan" if read_only else settings.approval)
    approver = Approver(mode, CommandRules(allow=settings.allow_commands, deny=settings.deny_commands), ask=ask)
    config = AgentConfig(
        secrets=secrets_of(settings),
        max_turns=settings.max_turns,
        thinking=Thinking(enabled=settings.thinking),
        sampling=Sampling(temperature=settings.temperature, top_p=settings.top_p,
                          max_tokens=settings.max_output_tokens),
    )
    tools = read_only_tools() if read_only else all_tools()
    agent = Agent(backend, workspace, approver, config, session=session, tools=tools, on_event=on_event)
    return AgentParts(agent, approver, workspace, session, tools)


def secrets_of(settings: Settings) -> tuple[str, ...]:
    """The API keys to keep out of everything shown or saved: the environment's and the config's."""
    from glmcode.agent.session import known_secrets

    config_key = settings.api_key if settings.api_key and len(settings.api_key) >= 8 else None
    return (*known_secrets(), *([config_key] if config_key else []))


def open_session(settings: Settings, repo: Path, *, resume: str | None, meta: dict[str, Any]) -> Any:
    """A new session log, or the one `--resume ID` / `--continue` ("last") names."""
    from glmcode.agent.session import SessionStore

    store = SessionStore(settings.sessions_path())
    if resume is not None:
        return store.open(resume, repo=str(repo) if resume == "last" else None)
    return store.create({"repo": str(repo), **meta})


@contextmanager
def ctrl_c_cancels(cancel: threading.Event, on_first: Callable[[], None]) -> Iterator[None]:
    """While running: the first Ctrl-C sets `cancel` (generation stops at the next token); a
    second one raises Interrupted when the block ends, and KeyboardInterrupt at once to break out
    of whatever is blocking (the agent turns that into a cancelled run)."""
    presses = 0

    def handle(signum: int, frame: Any) -> None:
        nonlocal presses
        presses += 1
        if presses == 1:
            cancel.set()
            on_first()
        else:
            raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, handle)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if presses > 1:
        raise Interrupted("interrupted")


def usage_dict(usage: Usage = Usage(0, 0)) -> dict[str, int]:
    """Token counts as the JSON output reports them (prompt, completion, cached)."""
    return asdict(usage)


# --- verifying a fix -------------------------------------------------------------------------------

def run_tests(command: str | None, repo: Path, timeout: float = 1800.0, secrets: tuple[str, ...] = ()) -> dict[str, Any]:
    """Run the test command (configured, else detected) in the repo.

    {"command", "passed", "exit_code", "output"}: output is the last 40 lines, `secrets` masked.
    """
    from glmcode.agent.session import mask_secrets
    from glmcode.tools.shell import detect_test_command, run_process

    command = command or detect_test_command(repo)
    if command is None:
        return {"command": None, "passed": False, "exit_code": None, "output": ""}
    outcome = run_process(command, repo, timeout)
    tail = mask_secrets("\n".join(outcome.output.strip().splitlines()[-40:]), secrets)
    if outcome.timed_out:
        tail += f"\n(timed out after {timeout:.0f}s)"
    return {"command": command, "passed": outcome.exit_code == 0, "exit_code": outcome.exit_code, "output": tail}


def describe_failure(result: Any) -> str | None:
    """One line for a run that did not finish cleanly."""
    if result.status == "done":
        return None
    if result.error:
        return str(result.error)
    return {"limit": "stopped: a limit was reached (see --max-turns)", "cancelled": "interrupted"}.get(result.status)
