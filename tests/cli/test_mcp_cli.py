"""MCP from the command line: `glmcode mcp list|add|remove|test`, `doctor`, servers in `fix` and
`chat` sessions (a spinner, one warning line for a server that does not start, no process left
behind, also after Ctrl-C), and keys kept out of listings and session files."""

from __future__ import annotations

import json
import signal
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.mcp.conftest import FLAKY, wait_until_gone

from .conftest import Cli, assert_one_line_error
from .test_repl import spawn_chat

pexpect = pytest.importorskip("pexpect")

SECRET = "sk-glmcode-test-0123456789abcdef"


def server_table(name: str, marker: str, *args: str, extra: str = "") -> str:
    arguments = ", ".join(json.dumps(arg) for arg in args)
    return (f"[mcp_servers.{name}]\ncommand = {json.dumps(sys.executable)}\nargs = [{arguments}]\n"
            f'env = {{ GLMCODE_TEST_MARKER = "{marker}", SERVICE_API_KEY = "{SECRET}" }}\n{extra}\n')


@pytest.fixture
def marker() -> str:
    return uuid.uuid4().hex


@pytest.fixture
def servers_repo(repo: Path, marker: str) -> Path:
    """The repo declares the time server (read-only hints trusted), the flaky one and one that crashes."""
    (repo / ".glmcode.toml").write_text(
        server_table("time", marker, "-m", "mcp_server_time", extra="trust_read_only = true")
        + server_table("flaky", marker, str(FLAKY), extra="tool_timeout_sec = 20")
        + server_table("broken", marker, str(FLAKY), "noisy"))
    return repo


def tool_call(tool: str, **arguments: object) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in arguments.items())
    return f"<tool_call>{tool}{pairs}</tool_call>"


def write_script(tmp_path: Path, steps: list[str]) -> str:
    path = tmp_path / "script.json"
    path.write_text(json.dumps(steps))
    return str(path)


def test_add_list_remove_keep_the_file_and_mask_keys(cli: Cli, repo: Path) -> None:
    config = cli.home / "config" / "glmcode" / "config.toml"
    config.parent.mkdir(parents=True)
    config.write_text("# my settings\napproval = \"auto-edit\"  # edits without asking\n")
    added = cli("mcp", "add", "git", "-e", "GIT_TOKEN=${MY_GIT_TOKEN}", "--", "mcp-server-git", "--repository", ".")
    assert added.returncode == 0, added.stderr
    assert cli("mcp", "add", "docs", "--url", "https://docs.example.com/mcp", "--header",
               "Authorization=Bearer ${DOCS_TOKEN}", "--scope", "repo").returncode == 0
    text = config.read_text()
    assert text.startswith("# my settings\napproval = \"auto-edit\"  # edits without asking\n"), "comments stay"
    assert '[mcp_servers.git]\ncommand = "mcp-server-git"\nargs = ["--repository", "."]' in text
    assert (repo / ".glmcode.toml").read_text().count("[mcp_servers.docs]") == 1

    listed = cli("mcp", "list", "--json")
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["git"]["target"] == "mcp-server-git --repository ." and rows["git"]["env"] == {
        "GIT_TOKEN": "${MY_GIT_TOKEN}"}
    assert rows["docs"]["headers"] == {"Authorization": "(set)"} and rows["docs"]["source"].endswith(".glmcode.toml")
    table = cli("mcp", "list")
    assert "git" in table.stdout and "https://docs.example.com/mcp" in table.stdout and "Bearer" not in table.stdout

    again = cli("mcp", "add", "git", "--", "other-server")
    assert again.returncode == 2 and "already in" in assert_one_line_error(again)
    neither = cli("mcp", "add", "x")
    assert neither.returncode == 2 and "after -- (stdio) or --url URL" in assert_one_line_error(neither)
    bad = cli("mcp", "add", "bad name", "--", "srv")
    assert bad.returncode == 2 and "letters, digits" in assert_one_line_error(bad)

    assert cli("mcp", "remove", "git").returncode == 0
    assert "[mcp_servers" not in config.read_text() and "# my settings" in config.read_text()
    gone = cli("mcp", "remove", "git")
    assert gone.returncode == 2 and "no MCP server 'git'" in assert_one_line_error(gone)


def test_mcp_test_lists_the_tools_or_fails_in_one_line(cli: Cli, servers_repo: Path, marker: str) -> None:
    tested = cli("mcp", "test", "time")
    assert tested.returncode == 0, tested.stderr
    assert "✓ time (stdio:" in tested.stdout and "2 tools" in tested.stdout
    assert "  get_current_time [read-only]: Get current time in a specific timezone" in tested.stdout
    broken = cli("mcp", "test", "broken")
    assert broken.returncode == 3
    line = assert_one_line_error(broken)
    assert line.startswith("glmcode: MCP server 'broken' did not start: it exited during startup: "
                           "flaky: cannot open the database /nonexistent.db")
    unknown = cli("mcp", "test", "nope")
    assert unknown.returncode == 2 and "configured: time, flaky, broken" in assert_one_line_error(unknown)
    assert wait_until_gone(marker) == []


def test_doctor_reports_the_servers_that_fail_to_start(cli: Cli, servers_repo: Path, marker: str) -> None:
    result = cli("doctor")
    assert "✓ MCP server time started (2 tools)" in result.stdout
    assert "✓ MCP server flaky started (7 tools)" in result.stdout
    assert ("✗ MCP server broken did not start: it exited during startup: flaky: cannot open the database"
            in result.stdout)
    assert "fix [mcp_servers.broken] in " in result.stdout and "`glmcode mcp test broken`" in result.stdout
    assert wait_until_gone(marker) == []


def test_a_fix_session_uses_mcp_tools_warns_once_and_leaves_nothing(cli: Cli, servers_repo: Path, marker: str,
                                                                   tmp_path: Path) -> None:
    script = write_script(tmp_path, [
        "Check the clock.</think>" + tool_call("mcp__time__get_current_time", timezone="UTC"),
        "Show its key.</think>" + tool_call("mcp__flaky__getenv", name="SERVICE_API_KEY"),
        "Done.</think>All good.",
    ])
    result = cli("fix", "check the time", "--yes", "--test-command", "true", "--replay", script, "-o", "stream-json")
    events = [json.loads(line) for line in result.stdout.splitlines()]
    init = events[0]
    assert {"mcp__time__get_current_time", "mcp__flaky__echo", "mcp__flaky__die"} <= set(init["tools"])
    assert not any(name.startswith("mcp__broken__") for name in init["tools"])
    notices = [e["message"] for e in events if e["type"] == "notice" and "MCP server" in e["message"]]
    assert len(notices) == 1 and notices[0].startswith("MCP server 'broken' did not start: it exited during startup")
    results = [e for e in events if e["type"] == "tool_result"]
    assert '"timezone": "UTC"' in results[0]["output"]
    assert results[1]["output"] == "SERVICE_API_KEY=[REDACTED]", "a key from a server's env is masked"
    assert SECRET not in result.stdout + result.stderr
    for session in (cli.home / "data" / "glmcode" / "sessions").glob("*.jsonl"):
        assert SECRET not in session.read_text()
    assert events[-1]["status"] == "done"
    assert wait_until_gone(marker) == []


def test_ask_offers_only_trusted_read_only_mcp_tools(cli: Cli, servers_repo: Path, marker: str,
                                                     tmp_path: Path) -> None:
    script = write_script(tmp_path, ["</think>It is noon."])
    result = cli("ask", "what time is it?", "--replay", script, "-o", "stream-json")
    tools = json.loads(result.stdout.splitlines()[0])["tools"]
    assert "mcp__time__get_current_time" in tools and not any(t.startswith("mcp__flaky__") for t in tools)
    assert wait_until_gone(marker) == []


def test_chat_starts_servers_with_a_spinner_and_stops_them_on_ctrl_c(home: Path, servers_repo: Path, marker: str,
                                                                    tmp_path: Path) -> None:
    script = [
        "</think>" + tool_call("mcp__flaky__sleep", seconds=60),
        "</think>Stopped.",
    ]
    child = spawn_chat(home, servers_repo, script, tmp_path, "--yes")
    try:
        assert "starting MCP servers time, flaky, broken" in child.before
        assert "MCP server 'broken' did not start: it exited during startup" in child.before
        child.expect("›")
        child.sendline("/mcp")
        child.expect(r"✓ time \(stdio\): get_current_time, convert_time")
        child.expect(r"✗ broken: it exited during startup")
        child.expect("›")
        child.sendline("sleep a minute")
        child.expect("mcp__flaky__sleep")
        time.sleep(1)
        child.kill(signal.SIGINT)
        child.expect("stopping")
        child.expect("the call to sleep was cancelled")
        child.expect("›")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert wait_until_gone(marker) == [], "no server outlives the session"
