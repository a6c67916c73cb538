"""`glmcode fix ISSUE --remote URL --yes` fixes a real bug in a real repository.

The fake server plays GLM-4.7-Flash: it reads the module, edits the buggy line, runs the tests
and finishes. Each scripted turn is built from the request it answers, so the edit only happens
if the file's contents really came back as a tool result; the test then reads every request body
to check that each tool result answered the call before it.

Three ways a server can speak: a vLLM / SGLang server with the GLM parsers on (structured
tool calls, `reasoning`), the same server without them (raw `<tool_call>` / `</think>` text in
the content), and the hosted API's dialect (`thinking: {...}`, `tool_stream`, fragments).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.fake_glm_server import FakeGlmServer, Turn, raw_reply, reply

from .conftest import API_KEY, BUG_LINE, FIXED_LINE, GlmcodeRunner, git, project_tests_pass

ISSUE = "total_price() returns the wrong amount: an order of 4 items at 2.50 and 3 at 1.00 should cost 13.00"
MODULE = "inventory/pricing.py"
THOUGHTS = (
    "The issue is about totals; total_price lives in inventory/pricing.py. Let me read it.",
    "The loop adds price and quantity; it must multiply them.",
    "Now run the test suite to check the fix.",
    "Both tests pass.",
)
SUMMARY = "Fixed `total_price` in inventory/pricing.py: each line now costs price * quantity."


def last_tool_result(body: dict[str, Any]) -> str:
    messages = body["messages"]
    return messages[-1]["content"] if messages[-1]["role"] == "tool" else ""


class Model:
    """Scripted GLM turns for one fix. Each turn checks the tool result it was sent; what it did
    not find is noted in `problems` and the turn gives up (so the repo stays broken)."""

    def __init__(self, step: Callable[..., Turn]) -> None:
        self.step = step  # (reasoning, content, calls) -> Turn in the server's style
        self.problems: list[str] = []

    def turns(self) -> list[Callable[[dict[str, Any]], Turn]]:
        return [self.read, self.edit, self.run_tests, self.finish]

    def _expect(self, body: dict[str, Any], needle: str, what: str) -> bool:
        if needle in last_tool_result(body):
            return True
        self.problems.append(f"{what}: {needle!r} not in the last tool result {last_tool_result(body)[:300]!r}")
        return False

    def _give_up(self) -> Turn:
        return self.step("", "I could not make sense of the tool result.", [])

    def read(self, body: dict[str, Any]) -> Turn:
        if ISSUE not in body["messages"][1]["content"]:
            self.problems.append("the issue text is not in the first user message")
        return self.step(THOUGHTS[0], "", [("read_file", {"path": MODULE})])

    def edit(self, body: dict[str, Any]) -> Turn:
        if not self._expect(body, BUG_LINE, "read_file"):
            return self._give_up()
        return self.step(THOUGHTS[1], "", [("edit_file", {"path": MODULE, "old_string": BUG_LINE,
                                                           "new_string": FIXED_LINE})])

    def run_tests(self, body: dict[str, Any]) -> Turn:
        if last_tool_result(body).startswith(("Error", "Denied")):
            self.problems.append(f"edit_file failed: {last_tool_result(body)[:300]}")
            return self._give_up()
        return self.step(THOUGHTS[2], "", [("run_tests", {})])

    def finish(self, body: dict[str, Any]) -> Turn:
        if not self._expect(body, "2 passed", "run_tests"):
            return self._give_up()
        return self.step(THOUGHTS[3], SUMMARY, [])


def structured(reasoning: str, content: str, calls: list[tuple[str, dict]]) -> Turn:
    """A server with reasoning and tool parsers: calls arrive as fragments (tool_stream style)."""
    return reply(content, reasoning=reasoning, fragment_arguments=7,
                 tool_calls=[{"name": name, "arguments": arguments} for name, arguments in calls])


def raw(reasoning: str, content: str, calls: list[tuple[str, dict]]) -> Turn:
    """A server without parsers: the model's own text (the template opened <think> already)."""
    tags = "".join(
        f"<tool_call>{name}" + "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in args.items())
        + "</tool_call>"
        for name, args in calls
    )
    return raw_reply(f"{reasoning}</think>{content}{tags}", chunk_size=6)


# (server options, reply style, glmcode runs the hosted-style launcher)
MODES = {
    "openai-compatible": ({"dialect": "openai", "reasoning_field": "reasoning"}, structured, False),
    "raw-tags": ({"dialect": "openai"}, raw, False),
    "hosted-style": ({"dialect": "hosted", "base_path": "/api/paas/v4"}, structured, True),
}


def fix_over_remote(glmcode: GlmcodeRunner, project: Path, mode: str, *extra: str):
    options, style, hosted = MODES[mode]
    model = Model(style)
    with FakeGlmServer(*model.turns(), api_key=API_KEY, **options) as server:
        run = glmcode("fix", ISSUE, "--remote", server.base_url, "--yes", *extra, cwd=project, hosted=hosted)
    return run, server, model


@pytest.mark.parametrize("mode", list(MODES))
def test_fix_over_a_remote_server_repairs_the_repository(glmcode: GlmcodeRunner, project: Path, mode: str) -> None:
    assert project_tests_pass(project).returncode == 1, "the project starts broken"

    run, server, model = fix_over_remote(glmcode, project, mode)

    assert run.returncode == 0, run.stdout + run.stderr
    assert model.problems == [] and server.violations == [] and server.remaining == 0
    after = project_tests_pass(project)
    assert after.returncode == 0 and "2 passed" in after.stdout, after.stdout
    assert git(project, "diff", "--numstat") == f"1\t1\t{MODULE}\n"
    assert SUMMARY in run.stdout
    assert "tests: pass" in run.stdout and f"+        {FIXED_LINE}" in run.stdout
    assert_requests_carried_the_tool_results(server.bodies)


def assert_requests_carried_the_tool_results(bodies: list[dict[str, Any]]) -> None:
    """Request n+1 holds request n's conversation, the model's step n (reasoning and calls with
    JSON-string arguments) and a tool message answering each call by its id."""
    assert len(bodies) == 4
    for number, body in enumerate(bodies[1:], start=1):
        previous = bodies[number - 1]["messages"]
        messages = body["messages"]
        assert messages[: len(previous)] == previous, "the conversation only grows"
        step, result = messages[len(previous):]
        assert step["role"] == "assistant" and step["reasoning_content"] == THOUGHTS[number - 1]
        [call] = step["tool_calls"]
        assert isinstance(call["function"]["arguments"], str)
        assert result == {"role": "tool", "tool_call_id": call["id"], "content": result["content"]}
    calls = [body["messages"][-2]["tool_calls"][0]["function"] for body in bodies[1:]]
    assert [call["name"] for call in calls] == ["read_file", "edit_file", "run_tests"]
    assert json.loads(calls[1]["arguments"]) == {"path": MODULE, "old_string": BUG_LINE, "new_string": FIXED_LINE}
    read, edited, tested = (body["messages"][-1]["content"] for body in bodies[1:])
    assert BUG_LINE in read and "def total_price(items):" in read
    assert MODULE in edited
    assert "2 passed" in tested and "PASSED" in tested
