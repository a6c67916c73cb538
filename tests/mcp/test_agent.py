"""The agent with MCP tools end to end: the replay backend plays the model's GLM-format tool calls
to real servers, through approval, output caps, timeouts and a server dying mid-call."""

from __future__ import annotations

import json

import pytest

from glmcode.agent.approval import Approver, CommandRules
from glmcode.agent.events import ToolFinished
from glmcode.agent.loop import Agent, AgentConfig
from glmcode.backends.replay import ReplayBackend
from glmcode.mcp.client import McpServers
from glmcode.mcp.tools import mcp_tools, qualified_name
from glmcode.tools.registry import all_tools
from glmcode.tools.workspace import Workspace

from .conftest import flaky_server, git_server, time_server, wait_until_gone


def tool_call(tool: str, **arguments: object) -> str:
    pairs = "".join(f"<arg_key>{key}</arg_key><arg_value>{value if isinstance(value, str) else json.dumps(value)}"
                    f"</arg_value>" for key, value in arguments.items())
    return f"<tool_call>{tool}{pairs}</tool_call>"


class Run:
    """One agent over real MCP servers; `results` are the tool results the model was given."""

    def __init__(self, repo, configs, script, *, mode="yolo", ask=None, rules=CommandRules(), limit=20_000):
        self.servers = McpServers(configs, repo)
        self.servers.start()
        self.backend = ReplayBackend(script)
        self.finished: list[ToolFinished] = []
        config = AgentConfig(tool_output_limit=limit, secrets=tuple(self.servers.secret_values()))
        self.agent = Agent(self.backend, Workspace(repo), Approver(mode, rules, ask=ask), config,
                           tools=all_tools() + mcp_tools(self.servers), on_event=self._event)

    def _event(self, event) -> None:
        if isinstance(event, ToolFinished):
            self.finished.append(event)

    def __call__(self, request: str):
        try:
            return self.agent.run(request)
        finally:
            self.servers.close()

    def tool_messages(self) -> list[str]:
        return [m["content"] for m in self.agent.messages if m["role"] == "tool"]


def test_the_model_sees_and_calls_git_and_time_tools(marker, git_repo):
    script = [
        "What changed?</think>" + tool_call("mcp__git__git_status", repo_path=str(git_repo)),
        "And the time.</think>" + tool_call("mcp__time__get_current_time", timezone="Europe/Paris"),
        "Done.</think>todo.txt is untracked; it is evening in Paris.",
    ]
    run = Run(git_repo, [git_server(marker, git_repo), time_server(marker)], script)
    result = run("what is going on?")
    assert result.status == "done" and result.final_text.startswith("todo.txt is untracked")
    offered = {spec["function"]["name"]: spec["function"] for spec in run.backend.requests[0].tools}
    assert {"read_file", "mcp__git__git_status", "mcp__git__git_log", "mcp__time__convert_time"} <= set(offered)
    assert "repo_path" in offered["mcp__git__git_log"]["parameters"]["properties"]
    status, clock = run.tool_messages()
    assert "todo.txt" in status
    assert json.loads(clock)["timezone"] == "Europe/Paris"
    assert wait_until_gone(marker) == []


def test_mcp_tools_go_through_the_approval_modes(marker, tmp_path):
    call = "Echo it.</think>" + tool_call("mcp__flaky__echo", text="hello")
    asked = []
    run = Run(tmp_path, [flaky_server(marker)], [call, "</think>ok"], mode="ask",
              ask=lambda request: asked.append(request) or False)
    run("echo hello")
    assert asked[0].tool_name == "mcp__flaky__echo" and asked[0].preview == 'mcp__flaky__echo {"text": "hello"}'
    assert run.finished[0].denied and run.tool_messages()[0].startswith("Denied: Refused: the user declined")

    run = Run(tmp_path, [flaky_server(marker)], [call, "</think>ok"], mode="plan")
    run("echo hello")
    assert run.finished[0].denied and "plan mode" in run.tool_messages()[0]

    run = Run(tmp_path, [flaky_server(marker)], [call, "</think>ok"], mode="ask",
              rules=CommandRules(allow=["mcp__flaky__echo"]))
    run("echo hello")
    assert run.tool_messages() == ["hello"], "an allow rule names the tool"

    run = Run(tmp_path, [flaky_server(marker)], [call, "</think>ok"], rules=CommandRules(deny=["mcp__flaky__echo"]))
    run("echo hello")
    assert "the user's rules deny `mcp__flaky__echo`" in run.tool_messages()[0], "deny wins even in yolo"


def test_trusted_read_only_hints_run_without_approval_even_in_plan_mode(marker, tmp_path):
    call = "</think>" + tool_call("mcp__time__get_current_time", timezone="UTC")
    trusted = Run(tmp_path, [time_server(marker, trust_read_only=True)], [call, "</think>ok"], mode="plan")
    trusted("time?")
    assert not trusted.finished[0].denied and '"timezone": "UTC"' in trusted.tool_messages()[0]
    untrusted = Run(tmp_path, [time_server(marker)], [call, "</think>ok"], mode="plan")
    untrusted("time?")
    assert untrusted.finished[0].denied, "without trust_read_only the hint changes nothing"


def test_a_huge_result_is_capped_like_any_tool_output(marker, tmp_path):
    script = ["</think>" + tool_call("mcp__flaky__huge", characters=2_000_000), "</think>that was long"]
    run = Run(tmp_path, [flaky_server(marker)], script, limit=5_000)
    assert run("make it big").status == "done"
    [seen] = run.tool_messages()
    assert len(seen) < 5_200 and "characters omitted: output truncated to 5000 characters" in seen


def test_timeouts_and_a_dying_server_are_tool_errors_the_model_sees(marker, tmp_path):
    script = [
        "</think>" + tool_call("mcp__flaky__sleep", seconds=30),
        "</think>" + tool_call("mcp__flaky__die"),
        "</think>" + tool_call("mcp__flaky__echo", text="again"),
        "</think>The flaky server is gone; I will stop here.",
    ]
    run = Run(tmp_path, [flaky_server(marker, tool_timeout_sec=1)], script)
    result = run("try the flaky server")
    assert result.status == "done", "the run goes on: each failure is one tool error"
    timed_out, died, gone = run.tool_messages()
    assert "sleep timed out after 1s" in timed_out
    assert "died during the call to die" in died
    assert "the MCP server 'flaky' is unavailable" in gone
    assert all(event.result.is_error for event in run.finished)


def test_keys_in_a_servers_env_are_masked_in_what_the_model_sees(marker, tmp_path):
    secret = "sk-live-0123456789abcdefXYZ"
    script = ["</think>" + tool_call("mcp__flaky__getenv", name="SERVICE_API_KEY"), "</think>ok"]
    run = Run(tmp_path, [flaky_server(marker, env={"SERVICE_API_KEY": secret})], script)
    run("leak it")
    assert run.tool_messages() == ["SERVICE_API_KEY=[REDACTED]"]


@pytest.mark.parametrize("server, tool, expected", [
    ("git", "git_status", "mcp__git__git_status"),
    ("my-server", "do.thing/now", "mcp__my-server__do_thing_now"),
])
def test_qualified_names_are_safe_for_the_model(server, tool, expected):
    assert qualified_name(server, tool) == expected


def test_over_long_or_clashing_names_get_a_short_hash():
    long_name = qualified_name("server", "t" * 80)
    assert len(long_name) == 64 and long_name.startswith("mcp__server__ttt")
    first = qualified_name("s", "a.b")
    assert qualified_name("s", "a/b", taken={first}) != first
