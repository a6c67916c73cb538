"""Servers without reasoning/tool parsers send the model's raw GLM text as content.

The routing (hold back, detect, stay structured) is tested on the assembler directly; the raw
text itself is parsed by chat_format.StreamParser, so those tests skip until it is present.
"""

from __future__ import annotations

import importlib.util

import pytest

from glmcode.backends.base import Thinking
from glmcode.backends.remote.stream import StreamAssembler
from glmcode.events import ContentDelta, Error, Finish, ReasoningDelta, ToolCall, ToolCallError
from tests.backends.conftest import READ_FILE, RUN_TESTS, collect, generic_backend, hosted_backend, of_type, text_of
from tests.fake_glm_server import raw_reply, reply

needs_chat_format = pytest.mark.skipif(
    importlib.util.find_spec("glmcode.chat_format") is None, reason="glmcode.chat_format (branch chat) is not merged yet"
)


def _content_chunks(*pieces: str) -> list[dict]:
    return [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in pieces]


def _run(assembler: StreamAssembler, chunks: list[dict]) -> list[list]:
    return [assembler.feed(chunk) for chunk in chunks] + [assembler.finish()]


def test_without_thinking_text_flows_and_only_a_possible_tag_start_waits():
    assembler = StreamAssembler([], thinking=False, detect_raw_tags=True)
    steps = _run(assembler, _content_chunks("Use a <tool", "box> here.", " Done <"))
    assert steps[0] == [ContentDelta("Use a ")]
    assert steps[1] == [ContentDelta("<toolbox> here.")]
    assert steps[2] == [ContentDelta(" Done ")]
    assert steps[3] == [ContentDelta("<"), Finish("stop")]


def test_with_thinking_a_structured_server_is_recognised_by_its_reasoning_field():
    assembler = StreamAssembler([], thinking=True, detect_raw_tags=True)
    held = assembler.feed(_content_chunks("\n\n")[0])  # e.g. whitespace before the reasoning field shows up
    assert held == []
    released = assembler.feed({"choices": [{"index": 0, "delta": {"reasoning_content": "Think."}}]})
    assert released == [ContentDelta("\n\n"), ReasoningDelta("Think.")]
    assert assembler.feed(_content_chunks("Answer.")[0]) == [ContentDelta("Answer.")]


def test_with_thinking_untagged_content_is_released_at_the_end():
    assembler = StreamAssembler([], thinking=True, detect_raw_tags=True)
    steps = _run(assembler, _content_chunks("Just ", "an answer."))
    assert steps[:2] == [[], []]
    assert steps[2] == [ContentDelta("Just an answer."), Finish("stop")]


def test_the_hosted_api_is_never_treated_as_raw(hosted):
    hosted.play(reply("Tags like <tool_call> and </think> can be plain text."))
    events = collect(hosted_backend(hosted))
    assert text_of(events, ContentDelta) == "Tags like <tool_call> and </think> can be plain text."
    assert of_type(events, ToolCall) == [] and events[-1] == Finish("stop")


RAW_TOOL_TURN = (
    "The test imports add; read the module.</think>Let me read it."
    "<tool_call>read_file<arg_key>path</arg_key><arg_value>src/calc.py</arg_value></tool_call>"
)


@needs_chat_format
def test_raw_reasoning_content_and_tool_call(vllm):
    vllm.play(raw_reply(RAW_TOOL_TURN, chunk_size=5))
    events = collect(generic_backend(vllm), tools=[READ_FILE], thinking=Thinking())
    assert text_of(events, ReasoningDelta).strip() == "The test imports add; read the module."
    assert text_of(events, ContentDelta).strip() == "Let me read it."
    calls = of_type(events, ToolCall)
    assert [(c.name, c.arguments) for c in calls] == [("read_file", {"path": "src/calc.py"})]
    assert calls[0].id  # the wire needs an id to answer it
    assert events[-1] == Finish("tool_calls")
    assert "<tool_call>" not in text_of(events, ContentDelta)


@needs_chat_format
def test_raw_calls_with_thinking_off(vllm):
    vllm.play(raw_reply("Running them.<tool_call>run_tests</tool_call>", chunk_size=3))
    events = collect(generic_backend(vllm), tools=[RUN_TESTS], thinking=Thinking(enabled=False))
    assert text_of(events, ContentDelta).strip() == "Running them."
    assert [(c.name, c.arguments) for c in of_type(events, ToolCall)] == [("run_tests", {})]
    assert vllm.bodies[0]["chat_template_kwargs"]["enable_thinking"] is False


@needs_chat_format
def test_a_cut_raw_stream_never_runs_its_calls(vllm):
    turn = raw_reply(RAW_TOOL_TURN + "<tool_call>run_tests</tool", chunk_size=6)
    vllm.play(turn.cut(after=len(turn.deltas) - 1))
    events = collect(generic_backend(vllm), tools=[READ_FILE, RUN_TESTS])
    assert of_type(events, ToolCall) == [] and of_type(events, ToolCallError) == []
    assert "Let me read it." in text_of(events, ContentDelta)
    assert of_type(events, Error)[0].details["kind"] == "cut" and events[-1] == Finish("error")
