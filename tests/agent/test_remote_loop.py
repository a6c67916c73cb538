"""The loop over the real remote backend and a fake hosted GLM API on 127.0.0.1, which checks
every request the agent sends: tool results answer earlier calls, reasoning goes back, no
message the hosted API would refuse."""

import threading

import pytest

from glmcode.agent.loop import AgentConfig
from glmcode.backends.remote import RemoteBackend, RemoteEndpoint
from glmcode.events import ContentDelta

from tests.agent.test_loop import make_agent, tool_results
from tests.fake_glm_server import FakeGlmServer, reply

KEY = "sk-test-agent-loop-0123456789"
READ = {"name": "todo"}
WRITE = {"name": "done", "text": "bought"}


@pytest.fixture
def server():
    with FakeGlmServer(dialect="hosted", api_key=KEY, base_path="/api/paas/v4") as server:
        yield server
    assert server.violations == []


def backend_for(server: FakeGlmServer) -> RemoteBackend:
    endpoint = RemoteEndpoint("zhipu", server.base_url, "ZHIPUAI_API_KEY", hosted=True, api_key=KEY)
    return RemoteBackend(endpoint, timeout=5.0, connect_timeout=2.0, retry_delay=0.01, max_retry_delay=0.05)


def test_tool_turns_go_back_to_the_api_well_formed(server, tmp_path):
    (tmp_path / "todo").write_text("buy milk")
    server.play(
        reply(reasoning="Read the note.", tool_calls=[{"name": "read_note", "arguments": READ, "id": "call_a"}]),
        reply(reasoning="Now write.", tool_calls=[{"name": "write_note", "arguments": WRITE}]),
        reply("Milk is bought.", reasoning="Finished."),
    )
    agent, _, _ = make_agent(tmp_path, [], backend=backend_for(server))
    result = agent.run("do my todo")
    assert (result.status, result.final_text, result.turns) == ("done", "Milk is bought.", 3)
    assert (tmp_path / "done").read_text() == "bought"
    assert result.usage.prompt_tokens == 3 * 21  # the server's own usage figures
    third = server.requests[2].body["messages"]
    assert [m["role"] for m in third] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert third[2]["reasoning_content"] == "Read the note."
    assert third[3] == {"role": "tool", "content": "buy milk", "tool_call_id": "call_a"}
    assert server.bodies[0]["thinking"]["type"] == "enabled"


def test_a_malformed_call_is_answered_and_the_next_request_is_valid(server, tmp_path):
    server.play(
        reply(tool_calls=[{"name": "write_note", "arguments": '{"name": "a", "text": '}]),  # cut-off JSON
        reply("I will try again later."),
    )
    agent, _, _ = make_agent(tmp_path, [], backend=backend_for(server))
    assert agent.run("write a note").status == "done"
    assert tool_results(agent)[0].startswith("Error:")
    assert not (tmp_path / "a").exists()


def test_after_a_cancelled_generation_the_conversation_goes_on(server, tmp_path):
    release = threading.Event()
    server.play(
        reply("A long answer that is cut short by the user", chunk_size=4).hold(after=3, until=release),
        reply("Fresh answer."),
    )
    cancel = threading.Event()
    agent, _, _ = make_agent(tmp_path, [], backend=backend_for(server))
    agent.on_event = lambda event: cancel.set() if isinstance(event, ContentDelta) else None
    result = agent.run("first", cancel=cancel)
    release.set()
    assert result.status == "cancelled"
    assert agent.messages[-1]["role"] == "assistant" and agent.messages[-1]["content"]
    agent.on_event = lambda event: None
    assert agent.run("second").final_text == "Fresh answer."


def test_loop_guard_stop_leaves_a_valid_conversation(server, tmp_path):
    same = {"name": "read_note", "arguments": {"name": "x"}}
    server.play(*[reply(tool_calls=[same]) for _ in range(3)], reply("Stopping."))
    agent, _, _ = make_agent(tmp_path, [], AgentConfig(repeat_warn=2, repeat_stop=3), backend=backend_for(server))
    assert agent.run("go").status == "limit"
    assert agent.run("why did you stop?").final_text == "Stopping."
