"""`ask` and `fix` end to end through real subprocesses, with the replay backend standing in for
the model, over real git repositories with real tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("glmcode.agent.loop", reason="needs the agent branch merged")

from glmcode.console import validate_event
from tests.conftest import ctrl_c_default

from .conftest import ANSI_ESCAPE, BUGGY, Cli, assert_one_line_error, clean_env


def tool_call(name: str, **arguments: str) -> str:
    args = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in arguments.items())
    return f"<tool_call>{name}{args}</tool_call>"


READ = "Let me look at calc.py.</think>" + tool_call("read_file", path="calc.py")
EDIT = "The sign is wrong.</think>" + tool_call("edit_file", path="calc.py", old_string="return a - b",
                                                  new_string="return a + b")
DONE = "Fixed.</think>`add` now returns the sum of its arguments."
FIX_SCRIPT = [READ, EDIT, DONE]


def session_user_messages(home: Path) -> list[str]:
    messages = []
    for path in sorted((home / "data" / "glmcode" / "sessions").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            record = json.loads(line)
            if record.get("type") == "message" and record["message"]["role"] == "user":
                messages.append(record["message"]["content"])
    return messages


def test_fix_with_yes_edits_verifies_and_prints_the_diff(cli: Cli, repo: Path, script) -> None:
    result = cli("fix", "add() subtracts instead of adding", "--yes", "--replay", script(FIX_SCRIPT))
    assert result.returncode == 0, result.stdout + result.stderr
    assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
    assert "`add` now returns the sum" in result.stdout
    assert "tests: pass (python -m pytest)\nchanged 1 file: calc.py\n" in result.stdout
    assert "+    return a + b" in result.stdout and "-    return a - b" in result.stdout
    assert "> edit_file calc.py" in result.stderr, "tool calls go to stderr when piped"
    assert not ANSI_ESCAPE.search(result.stdout + result.stderr)


def test_fix_reads_the_issue_from_stdin_or_a_file(cli: Cli, repo: Path, script, tmp_path: Path) -> None:
    result = cli("fix", "-", "--yes", "--replay", script(FIX_SCRIPT), input="Issue 12: add() is broken\n")
    assert result.returncode == 0, result.stderr
    issue_file = tmp_path / "issue.md"
    issue_file.write_text("Issue 13: subtraction where addition belongs")
    subprocess.run(["git", "checkout", "-q", "calc.py"], cwd=repo, check=True)
    assert cli("fix", str(issue_file), "--yes", "--replay", script(FIX_SCRIPT)).returncode == 0
    sent = session_user_messages(cli.home)
    assert any("Issue 12: add() is broken" in m for m in sent)
    assert any("Issue 13: subtraction where addition belongs" in m for m in sent)


def test_without_a_terminal_edits_are_refused_and_failing_tests_exit_5(cli: Cli, repo: Path, script) -> None:
    result = cli("fix", "add() subtracts", "--replay", script(FIX_SCRIPT), "--output-format", "json")
    assert result.returncode == 5, result.stderr
    assert (repo / "calc.py").read_text() == BUGGY, "nobody approved the edit"
    record = json.loads(result.stdout)
    assert validate_event(record) == []
    assert record["status"] == "tests_failed" and record["exit_code"] == 5
    assert record["tests"]["passed"] is False and "1 failed" in record["tests"]["output"]


def test_an_allow_rule_lets_a_command_run_without_a_terminal(cli: Cli, repo: Path, script) -> None:
    steps = ["Run the tests.</think>" + tool_call("run_command", command="git status --short"), DONE]
    (repo / ".glmcode.toml").write_text('allow_commands = ["git status"]\n')
    result = cli("ask", "status?", "--replay", script(steps), "--output-format", "stream-json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    # ask is read-only: run_command is not among its tools at all
    assert "run_command" not in records[0]["tools"]

    result = cli("fix", "status?", "--replay", script(steps), "--output-format", "stream-json")
    records = [json.loads(line) for line in result.stdout.splitlines()]
    tool_result = next(r for r in records if r["type"] == "tool_result")
    assert tool_result["denied"] is False and tool_result["name"] == "run_command"


def test_stream_json_events_follow_the_schema(cli: Cli, repo: Path, script) -> None:
    result = cli("fix", "add() subtracts", "--yes", "--replay", script(FIX_SCRIPT), "--output-format", "stream-json")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    for record in records:
        assert validate_event(record) == [], record
    types = [record["type"] for record in records]
    assert types[0] == "init" and types[-1] == "result"
    assert types.count("tool_call") == 2 and types.count("tool_result") == 2 and "reasoning" in types
    calls = [r for r in records if r["type"] == "tool_call"]
    assert calls[1]["name"] == "edit_file" and calls[1]["arguments"]["new_string"] == "return a + b"
    final = records[-1]
    assert final["status"] == "done" and final["turns"] == 3 and final["usage"]["completion_tokens"] > 0
    assert final["tests"]["passed"] is True and "+    return a + b" in final["diff"]
    assert final["session_id"] == records[0]["session_id"]


def test_ask_attaches_piped_stdin_and_is_read_only(cli: Cli, repo: Path, script) -> None:
    steps = ["Try an edit.</think>" + tool_call("edit_file", path="calc.py", old_string="a - b", new_string="a + b"),
             "Right, I cannot edit.</think>The diff flips a sign in `add`."]
    result = cli("ask", "review this", "--replay", script(steps), input="diff --git a/calc.py\n-x\n+y\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "The diff flips a sign in `add`."
    assert (repo / "calc.py").read_text() == BUGGY
    sent = session_user_messages(cli.home)[-1]
    assert sent.startswith("review this") and "diff --git a/calc.py\n-x\n+y" in sent


def test_turn_limit_exits_4(cli: Cli, repo: Path, script) -> None:
    result = cli("ask", "look", "--max-turns", "1", "--replay", script([READ, DONE]), "--output-format", "json")
    assert result.returncode == 4, result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "limit" and "turn limit" in record["error"]


def test_continue_resumes_the_last_session(cli: Cli, repo: Path, script) -> None:
    assert cli("ask", "first question", "--replay", script([DONE])).returncode == 0
    result = cli("ask", "second question", "--continue", "--replay", script([DONE]), "-o", "json")
    assert result.returncode == 0, result.stderr
    session_id = json.loads(result.stdout)["session_id"]
    path = cli.home / "data" / "glmcode" / "sessions" / f"{session_id}.jsonl"
    contents = path.read_text()
    assert "first question" in contents and "second question" in contents
    listed = cli("sessions")
    assert session_id in listed.stdout


def test_remote_without_a_key_exits_3(cli: Cli, repo: Path) -> None:
    result = cli("ask", "--remote", "hello")
    assert result.returncode == 3
    assert "ZHIPUAI_API_KEY" in assert_one_line_error(result)


def test_an_unreachable_remote_server_exits_3(cli: Cli, repo: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    result = cli("ask", "hello", "--remote", f"http://127.0.0.1:{port}/v1", "-o", "json",
                 env={"GLMCODE_API_KEY": "test-key-0123456789"})
    assert result.returncode == 3, result.stdout + result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "error" and record["exit_code"] == 3
    assert "test-key-0123456789" not in result.stdout + result.stderr


def test_ctrl_c_while_verifying_exits_130(home: Path, repo: Path, script) -> None:
    # in a directory that exists: Landlock, bubblewrap's fallback, keeps new top-level entries out
    (repo / "build").mkdir()
    marker = repo / "build" / "tests-started"
    (repo / ".glmcode.toml").write_text(f'test_command = "touch {marker} && sleep 60"\n')
    process = subprocess.Popen(
        [sys.executable, "-m", "glmcode", "fix", "bug", "--yes", "--replay", script(FIX_SCRIPT)],
        cwd=repo, env=clean_env(home), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True, preexec_fn=ctrl_c_default,
    )
    try:
        while not marker.exists():
            assert process.poll() is None, process.communicate()
        os.kill(process.pid, signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 130
    assert "Traceback" not in stderr and "interrupted" in stderr


def test_ask_over_a_remote_server(cli: Cli, repo: Path) -> None:
    from tests.fake_glm_server import FakeGlmServer, error, reply

    key = "sk-test-0123456789abcdef"
    with FakeGlmServer(reply("Looks fine to me.", reasoning="Reading the diff."), api_key=key,
                       dialect="openai") as server:
        result = cli("ask", "review this", "--remote", server.base_url, input="-old\n+new\n",
                     env={"GLMCODE_API_KEY": key})
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == "Looks fine to me."
        assert server.violations == []
        assert "+new" in server.requests[0].body["messages"][-1]["content"]

    with FakeGlmServer(error(401, "invalid api key", code="1001"), api_key=key) as server:
        result = cli("ask", "hi", "--remote", server.base_url, "-o", "json",
                     env={"GLMCODE_API_KEY": "sk-wrong-000000000000"})
    assert result.returncode == 3, result.stdout + result.stderr
    record = json.loads(result.stdout)
    assert record["status"] == "error" and "GLMCODE_API_KEY" in record["error"]


def test_fix_takes_a_long_one_line_issue_as_text(cli: Cli, repo: Path, script) -> None:
    # longer than a file name may be: checking whether it names a file must not crash
    issue = "add() subtracts " + "instead of adding " * 20
    result = cli("fix", issue, "--yes", "--replay", script(FIX_SCRIPT))
    assert result.returncode == 0, result.stderr
    assert any(issue.strip() in m for m in session_user_messages(cli.home))


# --- every failure is said once, on one line -------------------------------------------------------

def _free_port() -> int:
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.parametrize("command", ["ask", "fix"])
def test_an_unreachable_server_is_said_once(cli: Cli, repo: Path, command: str) -> None:
    port = _free_port()
    result = cli(command, "hello", "--remote", f"http://127.0.0.1:{port}/v1")
    assert result.returncode == 3
    assert result.stderr == (f"glmcode: connection refused by 127.0.0.1:{port}: "
                             f"is the server running at http://127.0.0.1:{port}/v1?\n")


def test_a_prompt_too_long_for_the_server_is_said_once(cli: Cli, repo: Path) -> None:
    from tests.fake_glm_server import FakeGlmServer, error

    with FakeGlmServer(error(400, "prompt is too long", code="1261"), dialect="openai") as server:
        result = cli("ask", "hello", "--remote", server.base_url)
    assert result.returncode == 4, result.stderr
    assert result.stderr == (
        f"glmcode: the prompt is too long for glm-4.7-flash at 127.0.0.1:{server.port} (HTTP 400, code 1261: "
        "prompt is too long); nothing to compact: the conversation is as short as it can be made\n")


def test_a_failed_compaction_joins_the_overflow_line(cli: Cli, repo: Path) -> None:
    from tests.fake_glm_server import FakeGlmServer, error, reply

    too_long = error(400, "prompt is too long", code="1261")
    with FakeGlmServer(reply("First answer."), reply("Second answer."), too_long, too_long,
                       dialect="openai") as server:
        assert cli("ask", "one", "--remote", server.base_url).returncode == 0
        assert cli("ask", "two", "--continue", "--remote", server.base_url).returncode == 0
        result = cli("ask", "three", "--continue", "--remote", server.base_url)
    assert result.returncode == 4, result.stderr
    overflow = f"the prompt is too long for glm-4.7-flash at 127.0.0.1:{server.port} (HTTP 400, code 1261: prompt is too long)"
    assert result.stderr == f"glmcode: {overflow}; compaction failed: {overflow}\n"


def test_a_run_that_never_reached_a_model_saves_no_session(cli: Cli, repo: Path) -> None:
    port = _free_port()
    result = cli("ask", "hello", "--remote", f"http://127.0.0.1:{port}/v1", "-o", "json")
    assert result.returncode == 3
    assert json.loads(result.stdout)["session_id"] is None
    assert cli("sessions").stdout.startswith("no saved sessions")
    assert not list((cli.home / "data" / "glmcode" / "sessions").glob("*.jsonl"))
