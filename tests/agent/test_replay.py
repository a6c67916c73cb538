import math
import threading

import pytest

from glmcode.agent.messages import AssistantStep
from glmcode.backends.base import Sampling, Thinking
from glmcode.backends.replay import ReplayBackend, ScriptExhausted
from glmcode.chat_format import render
from glmcode.events import ContentDelta, Finish, ToolCall, Usage

READ_SPEC = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file.",
        "parameters": {
            "type": "object",
            "properties": {"path": {"type": "string"}, "offset": {"type": "integer"}},
            "required": ["path"],
        },
    },
}
CALL = (
    "Let me look at it.</think>Reading now."
    "<tool_call>read_file<arg_key>path</arg_key><arg_value>src/a.py</arg_value>"
    "<arg_key>offset</arg_key><arg_value>10</arg_value></tool_call>"
)
MESSAGES = [{"role": "user", "content": "What is in src/a.py?"}]


def play(backend, thinking=Thinking(), messages=MESSAGES, cancel=None):
    events = list(backend.stream(messages, [READ_SPEC], thinking, Sampling(), cancel))
    step = AssistantStep()
    for event in events:
        step.add(event)
    return events, step


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_plays_reasoning_content_and_typed_tool_calls(chunk_size):
    events, step = play(ReplayBackend([CALL], chunk_size=chunk_size))
    assert "".join(step.reasoning) == "Let me look at it."
    assert step.text == "Reading now."
    assert [(c.name, c.arguments) for c in step.calls] == [("read_file", {"path": "src/a.py", "offset": 10})]
    assert events[-1] == Finish("tool_calls")


def test_streams_in_small_chunks_and_reports_plausible_usage():
    backend = ReplayBackend(["</think>" + "word " * 40], chunk_size=5)
    events, step = play(backend, thinking=Thinking(enabled=True))
    assert len([e for e in events if isinstance(e, ContentDelta)]) > 10
    usage = next(e for e in events if isinstance(e, Usage))
    prompt = render(MESSAGES, [READ_SPEC], enable_thinking=True, clear_thinking=False)
    assert usage.prompt_tokens == math.ceil(len(prompt) / 4)
    assert usage.completion_tokens == math.ceil(len("</think>" + "word " * 40) / 4)
    assert events[-1] == Finish("stop")


def test_thinking_off_plays_plain_content():
    _, step = play(ReplayBackend(["Just the answer."]), thinking=Thinking(enabled=False))
    assert (step.text, step.reasoning) == ("Just the answer.", [])


def test_records_each_request():
    backend = ReplayBackend([CALL, "ok</think>done"])
    play(backend)
    history = MESSAGES + [{"role": "assistant", "content": "x"}]
    play(backend, thinking=Thinking(enabled=False), messages=history)
    assert [r.messages for r in backend.requests] == [MESSAGES, history]
    assert backend.requests[1].thinking.enabled is False and backend.requests[0].tools == [READ_SPEC]
    history.append({"role": "user", "content": "later change"})
    assert len(backend.requests[1].messages) == 2  # a copy, not the caller's list


def test_running_out_of_script_is_a_clear_error():
    backend = ReplayBackend(["</think>only one"])
    play(backend)
    with pytest.raises(ScriptExhausted, match="asked for completion 2 but the script holds 1"):
        play(backend)


def test_cancel_stops_the_stream():
    cancel = threading.Event()
    stream = ReplayBackend(["</think>" + "a long answer " * 20], chunk_size=4).stream(
        MESSAGES, [], Thinking(), Sampling(), cancel
    )
    first = next(stream)
    cancel.set()
    rest = list(stream)
    assert isinstance(first, ContentDelta) and rest[-1] == Finish("cancelled")
    assert len("".join(e.text for e in rest if isinstance(e, ContentDelta))) < 10
    assert not any(isinstance(e, ToolCall) for e in rest)
