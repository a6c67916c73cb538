"""McpServers against real servers: the reference git and time servers, an HTTP server written
with the SDK, and servers that crash, hang, die mid-call or answer with far too much."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from glmcode.mcp.client import McpServers
from glmcode.mcp.config import parse_server

from .conftest import TOKEN, flaky_server, git_server, processes_with, stdio, time_server, wait_until_gone


def started(*configs, repo: Path = Path("."), environ=None, log_dir=None) -> McpServers:
    servers = McpServers(configs, repo, environ=environ, log_dir=log_dir)
    servers.start()
    return servers


def test_the_reference_git_server_works_on_a_temporary_repo(marker, git_repo):
    with started(git_server(marker, git_repo), repo=git_repo) as servers:
        names = {tool.name for tool in servers.tools()}
        assert {"git_status", "git_log", "git_diff_unstaged", "git_add", "git_commit"} <= names
        status = servers.call("git", "git_status", {"repo_path": str(git_repo)})
        assert not status.is_error and "todo.txt" in status.output
        log = servers.call("git", "git_log", {"repo_path": str(git_repo)})
        assert "Add the notes" in log.output and "Tess" in log.output
        schema = next(tool.input_schema for tool in servers.tools() if tool.name == "git_log")
        assert schema["type"] == "object" and "repo_path" in schema["properties"]


def test_the_reference_time_server_answers_and_reports_bad_input_as_a_tool_error(marker):
    with started(time_server(marker)) as servers:
        tool = next(tool for tool in servers.tools() if tool.name == "get_current_time")
        assert tool.read_only, "the time server marks its tools read-only"
        result = servers.call("time", "get_current_time", {"timezone": "Asia/Tokyo"})
        assert not result.is_error and json.loads(result.output)["timezone"] == "Asia/Tokyo"
        bad = servers.call("time", "get_current_time", {"timezone": "Mars/Olympus_Mons"})
        assert bad.is_error and "Mars/Olympus_Mons" in bad.output


def test_an_http_server_gets_its_headers_from_environment_variables(http_server):
    config = parse_server("notes", {"url": http_server, "headers": {"Authorization": "Bearer ${NOTES_TOKEN}"}})
    with started(config, environ={"NOTES_TOKEN": TOKEN}) as servers:
        assert {tool.name for tool in servers.tools()} == {"add_note", "read_note"}
        assert "1 notes" in servers.call("notes", "add_note", {"title": "plan", "text": "ship it"}).output
        assert servers.call("notes", "read_note", {"title": "plan"}).output == "ship it"
        assert TOKEN in servers.secret_values(), "header values are masked wherever glmcode shows text"
    with started(config, environ={"NOTES_TOKEN": "wrong-token-value"}) as servers:
        [failed] = servers.failed()
        assert failed.error == (f"{http_server} answered HTTP 401 Unauthorized: "
                                "check its headers (a missing or wrong key?)")
    with started(config, environ={}) as servers:
        assert servers.failed()[0].error == "header Authorization uses ${NOTES_TOKEN}, which is not set"


def test_servers_that_cannot_start_are_left_out_with_a_reason_and_the_rest_run(marker, tmp_path):
    configs = [
        time_server(marker),
        flaky_server(marker, "crashes", "crash"),
        flaky_server(marker, "complains", "noisy"),
        flaky_server(marker, "hangs", "hang", startup_timeout_sec=2),
        parse_server("missing", {"command": "glmcode-no-such-mcp-server"}),
        parse_server("offline", {"url": "http://127.0.0.1:9/mcp", "startup_timeout_sec": 5}),
    ]
    with started(*configs, log_dir=tmp_path / "logs") as servers:
        assert [state.name for state in servers.running()] == ["time"]
        reasons = {state.name: state.error for state in servers.failed()}
        assert reasons["crashes"] == "it exited during startup"
        assert reasons["complains"].startswith("it exited during startup: flaky: cannot open the database")
        assert str(tmp_path / "logs" / "mcp-complains.log") in reasons["complains"]
        assert reasons["hangs"] == "it did not start within 2s"
        assert reasons["missing"] == "command not found: glmcode-no-such-mcp-server"
        assert reasons["offline"].startswith("cannot connect to http://127.0.0.1:9/mcp")
        refused = servers.call("hangs", "echo", {"text": "x"})
        assert refused.is_error and "the MCP server 'hangs' is unavailable: it did not start" in refused.output
    assert wait_until_gone(marker) == [], "the hanging server was killed"


def test_a_call_that_times_out_is_an_error_and_the_server_stays_usable(marker):
    with started(flaky_server(marker, tool_timeout_sec=1)) as servers:
        result = servers.call("flaky", "sleep", {"seconds": 30})
        assert result.is_error and "sleep timed out after 1s" in result.output
        assert servers.call("flaky", "echo", {"text": "still here"}).output == "still here"


def test_a_server_that_dies_mid_call_is_an_error_then_unavailable(marker):
    with started(flaky_server(marker), time_server(marker)) as servers:
        result = servers.call("flaky", "die", {})
        assert result.is_error and "died during the call to die" in result.output
        later = servers.call("flaky", "echo", {"text": "anyone?"})
        assert later.is_error and "unavailable" in later.output
        assert [state.name for state in servers.running()] == ["time"], "the other server is unaffected"


def test_big_and_non_text_results(marker):
    with started(flaky_server(marker)) as servers:
        big = servers.call("flaky", "huge", {"characters": 3_000_000})
        assert not big.is_error and len(big.output) == 3_000_000  # the agent loop caps what the model sees
        picture = servers.call("flaky", "picture", {})
        assert picture.output == "[image content (image/png, 100 bytes) not shown: text only here]"


def test_the_tools_allow_list_and_disabled_servers(marker):
    configs = [flaky_server(marker, tools=["echo", "sleep"]), flaky_server(marker, "off", enabled=False)]
    with started(*configs) as servers:
        assert sorted(tool.name for tool in servers.tools()) == ["echo", "sleep"]
        assert list(servers.states) == ["flaky"]


def test_closing_ends_the_servers_and_everything_they_started(marker):
    servers = started(flaky_server(marker), time_server(marker))
    assert servers.call("flaky", "spawn", {}).output == "started"
    assert len(processes_with(marker)) >= 4  # two reapers, two servers, one grandchild
    servers.close()
    assert wait_until_gone(marker) == []


def test_a_killed_glmcode_leaves_no_server_behind(marker, tmp_path):
    """Even SIGKILL, which runs no cleanup: the reaper notices its parent is gone."""
    script = tmp_path / "session.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        from pathlib import Path
        sys.path.insert(0, {str(Path(__file__).parents[2])!r})
        from tests.mcp.conftest import flaky_server
        from glmcode.mcp.client import McpServers
        servers = McpServers([flaky_server({marker!r})], Path("."))
        servers.start()
        print(servers.call("flaky", "spawn", {{}}).output, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert result.returncode == -signal.SIGKILL and result.stdout.strip() == "started", result.stderr
    assert wait_until_gone(marker) == []


def test_secret_values_come_from_headers_credential_env_names_and_variables(marker):
    config = stdio("s", marker, "-c", "pass", env={"API_KEY": "k-1234567890", "LOG_LEVEL": "debug",
                                                    "TOKEN_FILE_NAME": "short", "FROM_ENV": "${MY_SECRET}"})
    servers = McpServers([config], Path("."), environ={"MY_SECRET": "s3cr3t-value-xyz"})
    assert sorted(servers.secret_values()) == ["k-1234567890", "s3cr3t-value-xyz"]
