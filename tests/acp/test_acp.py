"""`glmcode acp` driven over stdio by the protocol library's own client (`acp.spawn_agent_process`),
with the replay backend as the model: sessions, streamed thoughts and answers, edits that ask
permission (granted, then refused) with their diffs, modes, cancellation, MCP servers the client
passes, custom commands, and a loaded session's history."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from acp import PROTOCOL_VERSION, spawn_agent_process, text_block
from acp.schema import (
    AllowedOutcome, ClientCapabilities, DeniedOutcome, EnvVariable, McpServerStdio, RequestPermissionResponse,
)

from tests.cli.conftest import clean_env

CALC = "def add(a, b):\n    return a - b\n"


def call(name: str, **arguments: str) -> str:
    pairs = "".join(f"<arg_key>{key}</arg_key><arg_value>{value}</arg_value>" for key, value in arguments.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


READ = call("read_file", path="calc.py")
EDIT = call("edit_file", path="calc.py", old_string="return a - b", new_string="return a + b")


class Client:
    """An ACP client that records every update and answers permission requests from a list."""

    def __init__(self, answers: list[str] | None = None, on_permission: Any = None) -> None:
        self.updates: list[Any] = []
        self.permissions: list[Any] = []
        self.answers = list(answers or [])
        self.on_permission = on_permission
        self.conn: Any = None

    async def request_permission(self, session_id: str, tool_call: Any, options: list[Any], **kwargs: Any) -> Any:
        self.permissions.append((tool_call, options))
        if self.on_permission is not None:
            return await self.on_permission(session_id)
        return RequestPermissionResponse(outcome=AllowedOutcome(option_id=self.answers.pop(0), outcome="selected"))

    async def session_update(self, session_id: str, update: Any, **kwargs: Any) -> None:
        self.updates.append(update)

    def on_connect(self, conn: Any) -> None:
        self.conn = conn

    def text(self, kind: str) -> str:
        return "".join(u.content.text for u in self.updates if u.session_update == kind)

    def of(self, kind: str) -> list[Any]:
        return [update for update in self.updates if update.session_update == kind]


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    (root / "calc.py").write_text(CALC)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=root, check=True)
    return root


def run_session(tmp_path: Path, repo: Path, script: list[str], body: Any, *, replay: bool = True,
                client: Client | None = None) -> tuple[Client, str]:
    """Start `glmcode acp --replay`, initialize, open a session in `repo`, run `body(conn, session_id,
    client)`, close; returns the client and what the agent wrote to stderr."""
    script_path = tmp_path / "script.json"
    script_path.write_text(json.dumps(script))
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    stderr_path = tmp_path / "agent-stderr.log"
    client = client or Client()

    async def main() -> None:
        with stderr_path.open("w") as stderr:
            async with spawn_agent_process(
                lambda agent: client, sys.executable, "-m", "glmcode", "acp",
                *(["--replay", str(script_path)] if replay else []),
                env=clean_env(home), cwd=repo, transport_kwargs={"stderr": stderr.fileno()},
            ) as (conn, process):
                client.conn = conn
                ready = await conn.initialize(protocol_version=PROTOCOL_VERSION,
                                              client_capabilities=ClientCapabilities())
                assert ready.agent_info.name == "glmcode" and ready.agent_capabilities.load_session
                session = await conn.new_session(cwd=str(repo), mcp_servers=getattr(client, "mcp_servers", []))
                await body(conn, session, client)

    asyncio.run(asyncio.wait_for(main(), timeout=180))
    return client, stderr_path.read_text()


def test_a_streamed_answer_with_thoughts(tmp_path, repo):
    script = ["The user says hi. Answer briefly.</think>Hello! I can read, edit and test this repository."]

    async def body(conn, session, client):
        assert session.modes.current_mode_id == "ask"
        assert [mode.id for mode in session.modes.available_modes] == ["plan", "ask", "auto-edit", "yolo"]
        response = await conn.prompt(session_id=session.session_id, prompt=[text_block("hi")])
        assert response.stop_reason == "end_turn"

    client, _ = run_session(tmp_path, repo, script, body)
    assert client.text("agent_thought_chunk") == "The user says hi. Answer briefly."
    assert client.text("agent_message_chunk") == "Hello! I can read, edit and test this repository."
    assert len(client.of("agent_message_chunk")) > 3, "the answer arrives in pieces"


def test_an_edit_asks_permission_with_its_diff_granted_then_refused(tmp_path, repo):
    script = [
        "Read it first.</think>" + READ,
        "Fix the sign.</think>" + EDIT,
        "</think>Fixed.",
        "Change it back.</think>" + call("edit_file", path="calc.py", old_string="return a + b",
                                         new_string="return a * b"),
        "</think>You declined; calc.py stays as it is.",
    ]

    async def body(conn, session, client):
        first = await conn.prompt(session_id=session.session_id, prompt=[text_block("fix add")])
        assert first.stop_reason == "end_turn"
        assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"
        second = await conn.prompt(session_id=session.session_id, prompt=[text_block("now multiply")])
        assert second.stop_reason == "end_turn"

    client, _ = run_session(tmp_path, repo, script, body, client=Client(answers=["allow", "reject"]))
    assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n", "the refused edit did not happen"
    (granted, options), (refused, _) = client.permissions
    assert [option.kind for option in options] == ["allow_once", "allow_always", "reject_once"]
    assert granted.kind == "edit" and granted.title == "Edit calc.py"
    [diff] = granted.content
    assert diff.type == "diff" and diff.path == str(repo / "calc.py")
    assert (diff.old_text, diff.new_text) == (CALC, "def add(a, b):\n    return a + b\n")
    assert refused.content[0].new_text == "def add(a, b):\n    return a * b\n"
    read, edit, edit_back = client.of("tool_call")
    assert (read.kind, read.title, read.locations[0].path) == ("read", "Read calc.py", str(repo / "calc.py"))
    assert [edit.tool_call_id, edit_back.tool_call_id] == [granted.tool_call_id, refused.tool_call_id]
    updates = client.of("tool_call_update")
    assert [(u.tool_call_id, u.status) for u in updates] == [
        (read.tool_call_id, "completed"), (edit.tool_call_id, "in_progress"), (edit.tool_call_id, "completed"),
        (edit_back.tool_call_id, "failed")]
    assert updates[2].content[0].type == "diff", "a finished edit shows its diff"
    assert "declined" in updates[3].content[0].content.text


def test_modes_are_the_approval_modes(tmp_path, repo):
    script = ["</think>" + READ, "</think>" + EDIT, "</think>Plan mode: I would fix the sign in add."]

    async def body(conn, session, client):
        await conn.set_session_mode(session_id=session.session_id, mode_id="plan")
        response = await conn.prompt(session_id=session.session_id, prompt=[text_block("fix add")])
        assert response.stop_reason == "end_turn"

    client, _ = run_session(tmp_path, repo, script, body)
    assert client.permissions == [], "plan mode refuses without asking"
    assert (repo / "calc.py").read_text() == CALC
    read, edit = client.of("tool_call_update")
    assert read.status == "completed"
    assert edit.status == "failed" and "plan mode" in edit.content[0].content.text


def test_cancelling_a_streaming_answer(tmp_path, repo):
    script = ["</think>" + "All work and no play makes a dull agent. " * 4000]

    async def body(conn, session, client):
        prompt = asyncio.create_task(conn.prompt(session_id=session.session_id, prompt=[text_block("write")]))
        while not client.of("agent_message_chunk"):
            await asyncio.sleep(0.01)
        await conn.cancel(session_id=session.session_id)
        assert (await prompt).stop_reason == "cancelled"

    client, _ = run_session(tmp_path, repo, script, body)
    streamed = client.text("agent_message_chunk")
    assert 0 < len(streamed) < len(script[0]) - len("</think>"), "the answer stopped partway"


def test_cancelling_while_a_permission_request_is_open(tmp_path, repo):
    script = ["</think>" + call("run_command", command="echo hi > touched.txt"), "</think>never reached"]

    async def cancel_then_answer(session_id: str) -> Any:
        await client.conn.cancel(session_id=session_id)
        return RequestPermissionResponse(outcome=DeniedOutcome(outcome="cancelled"))

    client = Client(on_permission=cancel_then_answer)

    async def body(conn, session, client):
        response = await conn.prompt(session_id=session.session_id, prompt=[text_block("touch it")])
        assert response.stop_reason == "cancelled"

    run_session(tmp_path, repo, script, body, client=client)
    assert not (repo / "touched.txt").exists()
    [(tool_call, _)] = client.permissions
    assert tool_call.kind == "execute" and tool_call.title == "Run `echo hi > touched.txt`"


def test_mcp_servers_from_the_client_and_custom_commands(tmp_path, repo):
    (repo / ".glmcode" / "commands").mkdir(parents=True)
    (repo / ".glmcode" / "commands" / "clock.md").write_text(
        "---\ndescription: Tell the time somewhere\nargument-hint: ZONE\n---\nWhat time is it in $1?\n")
    script = ["</think>" + call("mcp__time__get_current_time", timezone="Asia/Tokyo"), "</think>It is late in Tokyo."]
    client = Client(answers=["always"])
    client.mcp_servers = [McpServerStdio(name="time", command=sys.executable, args=["-m", "mcp_server_time"],
                                         env=[EnvVariable(name="TZ", value="UTC")])]

    async def body(conn, session, client):
        while not client.of("available_commands_update"):
            await asyncio.sleep(0.01)
        response = await conn.prompt(session_id=session.session_id, prompt=[text_block("/clock Asia/Tokyo")])
        assert response.stop_reason == "end_turn"

    run_session(tmp_path, repo, script, body, client=client)
    [commands] = client.of("available_commands_update")
    [clock] = commands.available_commands
    assert (clock.name, clock.description, clock.input.root.hint) == ("clock", "Tell the time somewhere", "ZONE")
    [(tool_call, _)] = client.permissions
    assert tool_call.kind == "fetch" and tool_call.title == "get_current_time (time MCP server)"
    done = client.of("tool_call_update")[-1]
    assert done.status == "completed" and '"timezone": "Asia/Tokyo"' in done.content[0].content.text
    sessions = list((tmp_path / "home" / "data" / "glmcode" / "sessions").glob("*.jsonl"))
    records = [json.loads(line) for line in sessions[0].read_text().splitlines()]
    users = [r["message"]["content"] for r in records if r.get("type") == "message" and r["message"]["role"] == "user"]
    assert users == ["What time is it in Asia/Tokyo?"], "the custom command was expanded"


def test_a_loaded_session_replays_its_history(tmp_path, repo):
    script = ["</think>" + call("read_file", path="calc.py"), "Read it.</think>add subtracts."]

    async def first(conn, session, client):
        await conn.prompt(session_id=session.session_id, prompt=[text_block("what does add do?")])
        client.session_id = session.session_id

    client, _ = run_session(tmp_path, repo, script, first)
    loaded = Client()

    async def second(conn, session, client):
        await conn.load_session(cwd=str(repo), session_id=first_id, mcp_servers=[])

    first_id = client.session_id
    run_session(tmp_path, repo, [], second, client=loaded)
    kinds = [update.session_update for update in loaded.updates]
    assert kinds[:4] == ["user_message_chunk", "tool_call", "tool_call_update", "agent_thought_chunk"]
    assert loaded.text("user_message_chunk") == "what does add do?"
    assert loaded.text("agent_message_chunk") == "add subtracts."
    assert "return a - b" in loaded.of("tool_call_update")[0].content[0].content.text


def test_without_a_model_the_session_fails_with_the_fix_in_one_line(tmp_path, repo):
    from acp import RequestError

    async def body(conn, session, client):
        raise AssertionError("the session should not open")

    with pytest.raises(RequestError) as raised:
        run_session(tmp_path, repo, [], body, replay=False)
    assert "glmcode model pull" in str(raised.value)
