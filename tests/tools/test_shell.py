"""run_command and run_tests with real processes."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

from glmcode.tools.registry import get_tool
from glmcode.tools.shell import (
    HEAD_BYTES,
    TAIL_BYTES,
    detect_test_command,
    run_process,
    summarize_tests,
)
from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, write


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A killed child of an exited shell may linger as a zombie until init reaps it.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _wait_gone(pid: int) -> bool:
    for _ in range(100):  # the kill is already sent; this only waits for the kernel to reap it
        if not _alive(pid):
            return True
        time.sleep(0.05)
    return False


def test_run_command_runs_in_the_root_and_returns_the_exit_code(repo: Path) -> None:
    ws = Workspace(repo)
    ok = call(ws, "run_command", command="pwd && ls src")
    assert not ok.is_error
    assert ok.output.splitlines() == [str(repo.resolve()), "app.py", "[exit code 0]"]
    failed = call(ws, "run_command", command="echo oops >&2; exit 3")
    assert failed.is_error and failed.output.splitlines() == ["oops", "[exit code 3]"]


def test_commands_do_not_see_the_api_keys(repo: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZAI_API_KEY", "zai-key-0123456789")
    monkeypatch.setenv("GLMCODE_API_KEY", "generic-key-0123456789")
    monkeypatch.setenv("SOME_PROJECT_SETTING", "kept")
    result = call(Workspace(repo), "run_command", command="env")
    assert "SOME_PROJECT_SETTING=kept" in result.output
    assert "ZAI_API_KEY" not in result.output and "GLMCODE_API_KEY" not in result.output
    assert "0123456789" not in result.output


def test_timeout_kills_the_whole_process_group(repo: Path) -> None:
    ws = Workspace(repo, command_timeout=1)
    result = call(ws, "run_command", command="sleep 600 & echo $! > child.pid; echo started; wait")
    assert result.is_error
    assert "started" in result.output and "timed out after 1s" in result.output
    child = int((repo / "child.pid").read_text())
    assert _wait_gone(child), "the sleeping grandchild survived the timeout"


def test_background_processes_do_not_outlive_the_command(repo: Path) -> None:
    result = call(Workspace(repo), "run_command", command="sleep 600 & echo $! > bg.pid; echo done")
    assert result.output.splitlines() == ["done", "[exit code 0]"]
    assert _wait_gone(int((repo / "bg.pid").read_text()))


def test_long_output_keeps_head_and_tail(repo: Path) -> None:
    result = call(Workspace(repo), "run_command", command="seq 1 100000")
    lines = result.output.splitlines()
    assert lines[0] == "1" and lines[-2] == "100000" and lines[-1] == "[exit code 0]"
    assert any("bytes of output omitted" in line for line in lines)
    assert len(result.output) < HEAD_BYTES + TAIL_BYTES + 200


def test_run_command_preview_is_the_command(repo: Path) -> None:
    assert get_tool("run_command").preview(Workspace(repo), {"command": "make lint"}) == "make lint"
    assert get_tool("run_command").touched_paths(Workspace(repo), {"command": "make lint"}) is None


FAILING_SUITE = """
from calc import add

def test_add():
    assert add(2, 2) == 4

def test_add_negative():
    assert add(-1, -1) == -2

def test_passes():
    assert True
"""


def test_run_tests_runs_a_real_failing_pytest_suite(repo: Path) -> None:
    write(repo, "calc.py", "def add(a, b):\n    return a - b\n")
    write(repo, "test_calc.py", FAILING_SUITE)
    # Plugin autoload off: the shared venv's plugins only slow the inner pytest down.
    command = f"PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 {sys.executable} -m pytest -q -p no:cacheprovider"
    ws = Workspace(repo, test_command=command)
    result = call(ws, "run_tests")
    assert result.is_error
    assert result.output.splitlines()[-1] == "Tests FAILED: 2 failed, 1 passed (exit code 1)"
    narrowed = call(ws, "run_tests", args="-k passes")
    assert narrowed.output.splitlines()[-1] == "Tests PASSED: 1 passed, 2 deselected (exit code 0)"
    assert get_tool("run_tests").preview(ws, {"args": "-x"}).endswith("pytest -q -p no:cacheprovider -x")


def test_run_tests_without_any_test_command_says_so(plain: Path) -> None:
    result = call(Workspace(plain), "run_tests")
    assert result.is_error and "run_command" in result.output


@pytest.mark.parametrize(
    "files,expected",
    [
        ({"pyproject.toml": "[tool.pytest.ini_options]\n"}, "python -m pytest"),
        ({"tests/test_x.py": "def test(): pass\n"}, "python -m pytest"),
        ({"package.json": '{"scripts": {"test": "jest"}}'}, "npm test"),
        ({"Cargo.toml": "[package]\n"}, "cargo test"),
        ({"go.mod": "module x\n"}, "go test ./..."),
        ({"Makefile": "all:\n\techo\ntest:\n\techo ok\n"}, "make test"),
        ({"package.json": '{"scripts": {}}', "Makefile": "build:\n\techo\n"}, None),
    ],
)
def test_test_command_detection(tmp_path: Path, files: dict[str, str], expected: str | None) -> None:
    for name, content in files.items():
        write(tmp_path, name, content)
    assert detect_test_command(tmp_path) == expected


def test_detection_prefers_the_repositorys_virtualenv(tmp_path: Path) -> None:
    write(tmp_path, "conftest.py", "")
    write(tmp_path, ".venv/bin/python", "")
    assert detect_test_command(tmp_path) == ".venv/bin/python -m pytest"


@pytest.mark.parametrize(
    "output,code,expected",
    [
        ("...\n==== 3 failed, 10 passed, 1 skipped in 0.5s ====\n", 1,
         "Tests FAILED: 3 failed, 10 passed, 1 skipped (exit code 1)"),
        ("test result: ok. 4 passed; 0 failed; 0 ignored\ntest result: FAILED. 1 passed; 2 failed;\n", 101,
         "Tests FAILED: 5 passed, 2 failed (exit code 101)"),
        ("--- FAIL: TestX (0.00s)\nFAIL\tex.com/a\t0.01s\nok  \tex.com/b\t0.02s\n", 1,
         "Tests FAILED: 1 packages ok, 1 failed (1 failing tests) (exit code 1)"),
        ("Tests:       1 failed, 2 passed, 3 total\n", 1, "Tests FAILED: 1 failed, 2 passed, 3 total (exit code 1)"),
        ("all good\n", 0, "Tests PASSED (exit code 0)"),
    ],
)
def test_summaries_of_the_common_runners(output: str, code: int, expected: str) -> None:
    assert summarize_tests(output, code) == expected


@pytest.mark.usefixtures("ctrl_c_raises")
def test_ctrl_c_during_a_command_kills_its_process_group(repo: Path) -> None:
    pid_file = repo / "child.pid"

    def interrupt_once_started() -> None:
        while not pid_file.exists() or not pid_file.read_text().strip():
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=interrupt_once_started, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_process("sleep 600 & echo $! > child.pid; wait", repo, timeout=600)
    assert _wait_gone(int(pid_file.read_text()))
