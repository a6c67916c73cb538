"""Running processes: run_command and run_tests.

A command runs through the shell in the repository root, in a session of its own, so a timeout
kills it and everything it started (os.killpg), inside the workspace's OS sandbox (see
glmcode.sandbox: with one, even a process that detached from the session ends with the command).
Output (stdout and stderr interleaved) is kept head and tail: the start says what ran, the end
says how it failed; when the sandbox may have caused a failure, one line says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from glmcode.sandbox import UNCONFINED, Sandbox
from glmcode.settings import SECRET_ENV_VARS
from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.workspace import ToolError, Workspace

HEAD_BYTES = 8_000
TAIL_BYTES = 16_000
MAX_TIMEOUT = 1800.0
_CHUNK = 65536
_ENV_OVERRIDES = {"PAGER": "cat", "GIT_PAGER": "cat", "GIT_TERMINAL_PROMPT": "0", "TERM": "dumb"}


@dataclass(frozen=True)
class ProcessOutcome:
    exit_code: int | None  # None: killed at the timeout
    output: str  # capped, with a note where the middle was dropped
    timed_out: bool
    sandbox_hint: str | None = None  # a failure the sandbox may have caused: one line saying so


def command_environment() -> dict[str, str]:
    """Ours, without glmcode's API keys: a command the model wrote has no use for them, and
    must not be able to send them anywhere."""
    env = {name: value for name, value in os.environ.items() if name not in SECRET_ENV_VARS}
    return {**env, **_ENV_OVERRIDES}


def run_process(command: str, cwd: Path, timeout: float, sandbox: Sandbox = UNCONFINED) -> ProcessOutcome:
    """Run `command` with the shell in `sandbox`; after `timeout` seconds kill it and all it started.

    Raises ToolError when the sandbox cannot be enforced here: the command is not run."""
    if sandbox.unavailable is not None:
        raise ToolError(f"not run: {sandbox.unavailable}")
    process = subprocess.Popen(
        sandbox.argv(command), cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, start_new_session=True, env=command_environment(),
    )
    capture = _HeadTail()
    reader = threading.Thread(target=capture.consume, args=(process.stdout,), daemon=True)
    reader.start()
    timed_out = False
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        sandbox.stop(process)
    except BaseException:  # Ctrl-C: leave nothing running behind us
        sandbox.stop(process)
        _kill_group(process)
        raise
    # Also reap what the command left running in its group (a `sleep &` would hold the pipe open).
    _kill_group(process)
    process.wait()
    reader.join(timeout=5)
    exit_code = None if timed_out else process.returncode
    output = capture.text()
    hint = sandbox.blocked_hint(output) if exit_code != 0 else None
    return ProcessOutcome(exit_code, output, timed_out, hint)


def _kill_group(process: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):  # already gone
        os.killpg(process.pid, signal.SIGKILL)


class _HeadTail:
    """Keeps the first HEAD_BYTES and the last TAIL_BYTES of a stream, counting the bytes between."""

    def __init__(self) -> None:
        self.head = bytearray()
        self.tail: deque[bytes] = deque()
        self.tail_size = 0
        self.dropped = 0

    def consume(self, stream) -> None:
        with stream:
            while chunk := stream.read1(_CHUNK):
                room = HEAD_BYTES - len(self.head)
                if room > 0:
                    self.head += chunk[:room]
                    chunk = chunk[room:]
                if chunk:
                    self.tail.append(chunk)
                    self.tail_size += len(chunk)
                    while self.tail_size - len(self.tail[0]) >= TAIL_BYTES:
                        self.dropped += len(self.tail[0])
                        self.tail_size -= len(self.tail.popleft())

    def text(self) -> str:
        tail = b"".join(self.tail)
        extra = max(0, len(tail) - TAIL_BYTES)
        tail = tail[extra:]
        dropped = self.dropped + extra
        head = self.head.decode("utf-8", "replace")
        if not dropped:
            return head + tail.decode("utf-8", "replace")
        return (
            head + f"\n[... {dropped:,} bytes of output omitted ...]\n" + tail.decode("utf-8", "replace")
        )


def _timeout(workspace: Workspace, arguments: dict[str, Any]) -> float:
    requested = arguments.get("timeout")
    return min(float(requested), MAX_TIMEOUT) if requested else workspace.command_timeout


def _status_line(outcome: ProcessOutcome, timeout: float) -> str:
    if outcome.timed_out:
        return f"[timed out after {timeout:g}s; the command and its child processes were killed]"
    return f"[exit code {outcome.exit_code}]"


# -- run_command ------------------------------------------------------------------------------


def run_command(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    command = arguments["command"].strip()
    if not command:
        raise ToolError("command is empty")
    timeout = _timeout(workspace, arguments)
    outcome = run_process(command, workspace.root, timeout, workspace.sandbox)
    output = outcome.output.rstrip("\n")
    lines = [output, _status_line(outcome, timeout), outcome.sandbox_hint]
    return ToolResult("\n".join(line for line in lines if line), is_error=outcome.exit_code != 0)


RUN_COMMAND = Tool(
    name="run_command",
    description=(
        "Run a shell command in the repository root; returns its combined stdout and stderr and its exit "
        "code. Non-interactive: stdin is empty, so never start editors, pagers or prompts. The command and "
        "everything it started are killed at the timeout; background processes do not outlive it. Long "
        f"output keeps its first {HEAD_BYTES // 1000} KB and last {TAIL_BYTES // 1000} KB. Use run_tests "
        "for the test suite, and the file tools rather than cat or sed to read or change files."
    ),
    parameters={
        "type": "object",
        "properties": {
            "command": {"type": "string", "description": "The command line, e.g. `python -m build` or `ls -la src`."},
            "timeout": {"type": "number", "description": "Seconds before it is killed (default: configured limit)."},
        },
        "required": ["command"],
    },
    kind="command",
    run=run_command,
    preview=lambda workspace, arguments: str(arguments.get("command", "")),
)


# -- run_tests --------------------------------------------------------------------------------


def detect_test_command(root: Path) -> str | None:
    """The test command a repository's layout implies: pytest, npm, cargo, go or make; else None."""
    if _uses_pytest(root):
        venv_python = next((p for p in (root / ".venv/bin/python", root / "venv/bin/python") if p.exists()), None)
        python = shlex.quote(str(venv_python.relative_to(root))) if venv_python else "python"
        return f"{python} -m pytest"
    package = root / "package.json"
    if package.is_file():
        try:
            if json.loads(package.read_text(encoding="utf-8")).get("scripts", {}).get("test"):
                return "npm test"
        except (ValueError, AttributeError):
            pass
    if (root / "Cargo.toml").is_file():
        return "cargo test"
    if (root / "go.mod").is_file():
        return "go test ./..."
    makefile = root / "Makefile"
    if makefile.is_file() and re.search(r"^test\s*:", makefile.read_text(errors="replace"), re.MULTILINE):
        return "make test"
    return None


def _uses_pytest(root: Path) -> bool:
    if any((root / name).is_file() for name in ("pytest.ini", "conftest.py")):
        return True
    for name, marker in (("pyproject.toml", "[tool.pytest"), ("setup.cfg", "[tool:pytest]"), ("tox.ini", "[pytest]")):
        path = root / name
        if path.is_file() and marker in path.read_text(errors="replace"):
            return True
    return any(root.glob("test_*.py")) or any(root.glob("tests/**/test_*.py")) or any(root.glob("tests/**/*_test.py"))


def test_command_line(workspace: Workspace, arguments: dict[str, Any]) -> str | None:
    """The full command run_tests would run, or None when none is configured or detected."""
    base = workspace.test_command or detect_test_command(workspace.root)
    if base is None:
        return None
    extra = str(arguments.get("args") or "").strip()
    return f"{base} {extra}" if extra else base


_COUNT = re.compile(r"(\d+) (passed|failed|errors?|skipped|deselected|xfailed|xpassed|ignored|total)\b")


def summarize_tests(output: str, exit_code: int | None) -> str:
    """One line: PASSED/FAILED with the counts the test runner printed (pytest, jest, cargo, go)."""
    verdict = "PASSED" if exit_code == 0 else "FAILED"
    counts = _test_counts(output)
    return f"Tests {verdict}" + (f": {counts}" if counts else "") + f" (exit code {exit_code})"


def _test_counts(output: str) -> str:
    cargo = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed", output)
    if cargo:  # one line per test binary: add them up
        return f"{sum(int(p) for p, _ in cargo)} passed, {sum(int(f) for _, f in cargo)} failed"
    go_packages = re.findall(r"^(ok|FAIL)\s+\S+\s+[\d.]+s", output, re.MULTILINE)
    if go_packages:
        failed_tests = len(re.findall(r"^\s*--- FAIL", output, re.MULTILINE))
        ok, failed = go_packages.count("ok"), go_packages.count("FAIL")
        return f"{ok} packages ok, {failed} failed ({failed_tests} failing tests)"
    lines = [line for line in output.splitlines() if _COUNT.search(line)]
    return ", ".join(f"{n} {word}" for n, word in _COUNT.findall(lines[-1])) if lines else ""


def run_tests(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    command = test_command_line(workspace, arguments)
    if command is None:
        raise ToolError(
            "no test command is configured and none was detected (pytest, npm test, cargo test, go test, "
            "make test); run the tests with run_command instead"
        )
    timeout = _timeout(workspace, arguments)
    outcome = run_process(command, workspace.root, timeout, workspace.sandbox)
    if outcome.timed_out:
        summary = _status_line(outcome, timeout)
    else:
        summary = summarize_tests(outcome.output, outcome.exit_code)
    hint = f"\n{outcome.sandbox_hint}" if outcome.sandbox_hint else ""
    return ToolResult(f"$ {command}\n{outcome.output.rstrip()}\n{summary}{hint}", is_error=outcome.exit_code != 0)


RUN_TESTS = Tool(
    name="run_tests",
    description=(
        "Run the project's test suite (the configured test command, or the one the repository implies: "
        "pytest, npm test, cargo test, go test, make test) and return its output with a pass/fail "
        "summary. Pass args to narrow it, e.g. a test file or `-k name` for pytest."
    ),
    parameters={
        "type": "object",
        "properties": {
            "args": {"type": "string", "description": "Appended to the test command, e.g. `tests/test_x.py -x`."},
            "timeout": {"type": "number", "description": "Seconds before it is killed (default: configured limit)."},
        },
        "required": [],
    },
    kind="command",
    run=run_tests,
    preview=test_command_line,
)
