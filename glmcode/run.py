"""One agent request from start to end: `glmcode ask` and `glmcode fix`.

`run_task` loads the settings for the flags, opens the backend and a session, builds the agent
(glmcode.launch), runs the request under Ctrl-C handling, verifies a fix with the test command,
and hands the end of the run to the renderer (glmcode.console). Exit codes for a finished run
are decided here (`exit_code_for`), next to where runs end. The REPL (glmcode.repl) runs its
requests with the same Ctrl-C handling and failure lines.
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from glmcode import __version__
from glmcode.backends.base import Backend
from glmcode.console import ApprovalPrompt, JsonRenderer, Renderer, RunReport, RunStats, make_renderer
from glmcode.errors import GlmcodeError, Interrupted, UsageError
from glmcode.events import Notice, Usage
from glmcode.launch import (
    backend_label, build_agent, command_sandbox, model_label, open_backend, open_session, secrets_of,
    start_mcp_servers,
)
from glmcode.sandbox import Sandbox
from glmcode.options import ApprovalMode
from glmcode.settings import Settings, find_repo, load_settings

if TYPE_CHECKING:
    from glmcode.agent.approval import ApprovalRequest
    from glmcode.agent.loop import RunResult

# RunResult.status -> process exit code. "tests_failed" is what `fix` reports on top.
EXIT_CODES = {"done": 0, "error": 1, "limit": 4, "tests_failed": 5, "cancelled": 130}


def exit_code_for(status: str, error: BaseException | None = None) -> int:
    """The exit code for a run that ended with `status`; a GlmcodeError brings its own code."""
    if status == "error" and isinstance(error, GlmcodeError):
        return error.exit_code
    return EXIT_CODES.get(status, 1)


@dataclass
class RunFlags:
    """The flags the agent commands share (`ask`, `fix`, `chat`); the CLI declares each once."""

    model: str | None = None
    remote: str | None = None
    remote_model: str | None = None
    device: str | None = None
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_dir: Path | None = None
    no_disk_cache: bool = False
    no_server: bool = False
    approval: str | None = None
    yes: bool = False
    sandbox: str | None = None
    sandbox_network: bool = False
    no_think: bool = False
    show_thinking: bool = False
    max_turns: int | None = None
    resume: str | None = None
    continue_last: bool = False
    repo: Path | None = None
    output_format: str = "text"
    replay: Path | None = None
    test_command: str | None = None

    def overrides(self) -> dict[str, Any]:
        """The settings these flags set (None: not given, the configuration decides)."""
        return {
            "model": self.model, "remote": self.remote, "remote_model": self.remote_model,
            "device": self.device, "dtype": self.dtype, "quantization": self.quantization,
            "kv_cache_dir": str(self.kv_cache_dir) if self.kv_cache_dir else None,
            "disk_cache": False if self.no_disk_cache else None,
            "attach_server": False if self.no_server else None,
            "approval": self.approval, "max_turns": self.max_turns,
            "sandbox": self.sandbox, "sandbox_network": True if self.sandbox_network else None,
            "thinking": False if self.no_think else None,
            "show_thinking": True if self.show_thinking else None,
            "test_command": self.test_command,
        }

    def resume_id(self) -> str | None:
        if self.resume and self.continue_last:
            raise UsageError("use either --resume ID or --continue, not both")
        return "last" if self.continue_last else self.resume


# --- the requests ---------------------------------------------------------------------------------

FIX_PROMPT = (
    "Fix the following issue in this repository. Find the cause, make the smallest correct "
    "change, and run the tests to check it. Finish with a short summary of what you changed.\n\n"
    "Issue:\n{issue}"
)


def ask_prompt(question: str, attached: str) -> str:
    """The question, with piped input (if any) attached in a code fence."""
    if not attached.strip():
        return question
    return f"{question}\n\nInput attached from stdin:\n{_fenced(attached)}"


def fix_prompt(issue: str) -> str:
    return FIX_PROMPT.format(issue=issue)


def _fenced(text: str) -> str:
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}\n{text.rstrip(chr(10))}\n{fence}"


# --- running one request to the end -----------------------------------------------------------------

def run_task(flags: RunFlags, prompt: str, *, command: str, read_only: bool, verify: bool) -> int:
    """Run the agent on one request to the end, render it, and return the exit code."""
    repo = find_repo(flags.repo)
    settings = load_settings(repo, flags.overrides())
    stats = RunStats(model=model_label(settings, flags.replay))
    renderer = make_renderer(flags.output_format, stats, show_thinking=settings.show_thinking)
    started = time.monotonic()
    try:
        backend = open_backend(settings, replay=flags.replay, show_progress=sys.stdout.isatty())
        try:
            report = _run_agent(flags, settings, repo, backend, renderer, prompt, command, read_only, verify)
        finally:
            backend.close()
    except GlmcodeError as error:  # the run could not start; JSON consumers still get a result
        if isinstance(renderer, JsonRenderer):
            renderer.finish(RunReport(status="error", exit_code=error.exit_code, result="", turns=0,
                                      duration_ms=_since(started), usage=usage_dict(), error=str(error)))
        raise
    report.duration_ms = _since(started)
    renderer.finish(report)
    return report.exit_code


def _since(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def _run_agent(flags: RunFlags, settings: Settings, repo: Path, backend: Backend, renderer: Renderer,
               prompt: str, command: str, read_only: bool, verify: bool) -> RunReport:
    stats = renderer.stats
    stats.context_window = backend.context_window
    session = open_session(settings, repo, resume=flags.resume_id(), meta={"command": command})
    cancel = threading.Event()
    interactive = flags.output_format == "text" and sys.stdin.isatty() and sys.stdout.isatty()
    ask = _approval_callback(flags.yes, interactive, renderer, cancel)
    sandbox = command_sandbox(settings, repo, unattended=flags.yes or command == "fix")
    with start_mcp_servers(settings, repo, read_only=read_only, show_progress=sys.stderr.isatty()) as servers:
        parts = build_agent(settings, backend, repo, read_only=read_only, ask=ask, on_event=renderer.event,
                            session=session, sandbox=sandbox, mcp=servers)
        approval = ApprovalMode.PLAN.value if read_only else settings.approval
        renderer.start({"session_id": session.id, "model": stats.model,
                        "backend": backend_label(settings, flags.replay, backend), "repo": str(repo), "approval": approval,
                        "sandbox": sandbox.name, "tools": [tool.name for tool in parts.tools],
                        "version": __version__})
        if sandbox.unavailable is not None and not read_only:
            renderer.event(Notice(f"commands will be refused: {sandbox.unavailable}"))
        for warning in servers.warnings():
            renderer.event(Notice(warning))

        def stopping() -> None:
            servers.interrupt()
            print("\nstopping… (Ctrl-C again to quit)", file=sys.stderr)

        with ctrl_c_cancels(cancel, on_first=stopping):
            result = parts.agent.run(prompt, cancel=cancel)
    status, error = result.status, describe_failure(result)
    tests = diff = None
    if verify:
        diff = parts.agent.checkpoints.diff()
        if status == "done":
            tests = run_tests(settings.test_command, repo, secrets=secrets_of(settings), sandbox=sandbox)
            if sandbox.unavailable is not None:
                status, error = "error", f"the tests were not run: {sandbox.unavailable}"
            elif tests["command"] is not None and not tests["passed"]:
                status, error = "tests_failed", "the tests still fail"
    return RunReport(status=status, exit_code=exit_code_for(status, result.exception),
                     result=result.final_text or "", turns=result.turns, duration_ms=0,
                     usage=usage_dict(result.usage), session_id=session.id if session.saved else None, error=error,
                     tests=tests, diff=diff)


def _approval_callback(yes: bool, interactive: bool, renderer: Renderer,
                       cancel: threading.Event) -> Callable[[ApprovalRequest], bool] | None:
    """--yes approves; a person at a terminal is asked; otherwise nobody can answer (refused)."""
    if yes:
        return lambda request: True
    if interactive:
        return ApprovalPrompt(renderer, Console(), input, on_interrupt=cancel.set)
    return None


# --- shared with the REPL -------------------------------------------------------------------------

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


def describe_failure(result: RunResult) -> str | None:
    """One line for a run that did not finish cleanly."""
    if result.status == "done":
        return None
    if result.error:
        return str(result.error)
    return {"limit": "stopped: a limit was reached (see --max-turns)", "cancelled": "interrupted"}.get(result.status)


# --- verifying a fix -------------------------------------------------------------------------------

def run_tests(command: str | None, repo: Path, timeout: float = 1800.0, secrets: tuple[str, ...] = (),
              sandbox: Sandbox | None = None) -> dict[str, Any]:
    """Run the test command (configured, else detected) in the repo, in the agent's sandbox: the
    model may have written the tests.

    {"command", "passed", "exit_code", "output"}: output is the last 40 lines, `secrets` masked.
    """
    from glmcode.agent.session import mask_secrets
    from glmcode.sandbox import UNCONFINED
    from glmcode.tools.shell import detect_test_command, run_process
    from glmcode.tools.workspace import ToolError

    command = command or detect_test_command(repo)
    if command is None:
        return {"command": None, "passed": False, "exit_code": None, "output": ""}
    try:
        outcome = run_process(command, repo, timeout, sandbox or UNCONFINED)
    except ToolError as refusal:
        return {"command": command, "passed": False, "exit_code": None, "output": str(refusal)}
    tail = mask_secrets("\n".join(outcome.output.strip().splitlines()[-40:]), secrets)
    if outcome.timed_out:
        tail += f"\n(timed out after {timeout:.0f}s)"
    if outcome.sandbox_hint:
        tail += f"\n{outcome.sandbox_hint}"
    return {"command": command, "passed": outcome.exit_code == 0, "exit_code": outcome.exit_code, "output": tail}
