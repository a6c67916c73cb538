"""The fake server's request checks catch what a real server would reject."""

from __future__ import annotations

import httpx
import pytest

from tests.fake_glm_server import FakeGlmServer, check_request, reply

GOOD = {"model": "glm-4.7-flash", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
CALL = {"id": "call_1", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a"}'}}


@pytest.mark.parametrize("change, hosted, problem", [
    ({"stream": False}, True, "stream must be true"),
    ({"messages": [{"role": "system", "content": "x"}]}, True, "only of system and assistant"),
    ({"messages": [{"role": "user", "content": "x", "name": "me"}]}, True, "does not accept 'name'"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "",
                    "tool_calls": [{**CALL, "function": {"name": "read_file", "arguments": {"path": "a"}}}]}]}, True,
     "arguments must be a JSON string"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
                   {"role": "tool", "tool_call_id": "call_2", "content": "A"}]}, False, "answers no earlier tool call"),
    ({"chat_template_kwargs": {"enable_thinking": True}}, True, "unsupported field chat_template_kwargs"),
    ({"thinking": {"type": "enabled"}}, False, "unsupported field thinking"),
    ({"thinking": {"type": "on"}}, True, "thinking.type"),
    ({"temperature": 0.0}, True, "temperature must be in (0, 1]"),
    ({"tool_stream": True}, True, "tool_stream without tools"),
])
def test_bad_bodies_are_reported(change, hosted, problem):
    assert check_request(GOOD, hosted=hosted) == []
    problems = check_request({**GOOD, **change}, hosted=hosted)
    assert any(problem in p for p in problems), problems


def test_a_bad_request_is_answered_400_and_recorded():
    with FakeGlmServer(reply("unused"), dialect="hosted", api_key="sk-fake-key") as server:
        url = f"{server.base_url}/chat/completions"
        unauthorised = httpx.post(url, json=GOOD)
        rejected = httpx.post(url, json={**GOOD, "seed": 1}, headers={"Authorization": "Bearer sk-fake-key"})
    assert unauthorised.status_code == 401 and unauthorised.json()["error"]["code"] == "1001"
    assert rejected.status_code == 400 and "unsupported field seed" in rejected.json()["error"]["message"]
    assert server.violations == ["unsupported field seed"] and server.remaining == 1


def test_a_request_past_the_end_of_the_script_is_a_violation():
    with FakeGlmServer(dialect="openai") as server:
        response = httpx.post(f"{server.base_url}/chat/completions", json=GOOD)
    assert response.status_code == 500 and server.violations == ["a request arrived after the script ended"]


def test_a_turn_can_depend_on_the_request():
    def echo(body):
        return reply(f"you said {body['messages'][-1]['content']}")

    with FakeGlmServer(echo, dialect="openai") as server:
        with httpx.stream("POST", f"{server.base_url}/chat/completions", json=GOOD) as response:
            text = response.read().decode()
    assert '"content": "you "' in text and text.rstrip().endswith("data: [DONE]")
