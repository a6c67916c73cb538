"""render() against the official template rendered by jinja2."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from glmcode.backends.base import Thinking
from glmcode.chat_format import render, template_flags
from tests.chat_format import strategies
from tests.chat_format.reference import jinja_render

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=strategies.messages, tools=strategies.tools, flags=strategies.flags)
def test_render_matches_official_template(messages, tools, flags):
    assert render(messages, tools, **flags) == jinja_render(messages, tools, **flags)


def test_documented_examples():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "2+2?"},
    ]
    assert render(history) == "[gMASK]<sop><|user|>Hi<|assistant|></think>Hello!<|user|>2+2?<|assistant|><think>"
    assert render(history, clear_thinking=False) == (
        "[gMASK]<sop><|user|>Hi<|assistant|><think>greet</think>Hello!<|user|>2+2?<|assistant|><think>"
    )
    assert render(history, enable_thinking=False) == (
        "[gMASK]<sop><|user|>Hi<|assistant|></think>Hello!<|user|>2+2?<|assistant|></think>"
    )


def test_tool_turn_with_interleaved_reasoning():
    messages = [
        {"role": "system", "content": "You are helpful."},
        {"role": "user", "content": "Weather in Beijing and Shanghai?"},
        {
            "role": "assistant",
            "content": None,
            "reasoning_content": "Need two calls.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Beijing", "days": 2}}},
                {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Shanghai", "days": 2}'}},
            ],
        },
        {"role": "tool", "content": '{"temp": 26}'},
        {"role": "tool", "content": '{"temp": 28}'},
    ]
    rendered = render(messages, [WEATHER_TOOL])
    assert rendered == jinja_render(messages, [WEATHER_TOOL])
    assert rendered.endswith(
        "<|system|>You are helpful.<|user|>Weather in Beijing and Shanghai?<|assistant|><think>Need two calls.</think>"
        "<tool_call>get_weather<arg_key>city</arg_key><arg_value>Beijing</arg_value><arg_key>days</arg_key>"
        "<arg_value>2</arg_value></tool_call><tool_call>get_weather<arg_key>city</arg_key><arg_value>Shanghai"
        "</arg_value><arg_key>days</arg_key><arg_value>2</arg_value></tool_call><|observation|><tool_response>"
        '{"temp": 26}</tool_response><tool_response>{"temp": 28}</tool_response><|assistant|><think>'
    )
    assert '{"city": {"type": "string"}, "days": {"type": "integer"}}' in rendered


def test_argument_values_strings_raw_others_json():
    call = {"name": "g", "arguments": {"l": [1, "é"], "b": True, "s": " keep ", "none": None}}
    rendered = render([{"role": "assistant", "content": "", "tool_calls": [call]}], add_generation_prompt=False)
    assert rendered.endswith(
        "<tool_call>g<arg_key>l</arg_key><arg_value>[1, \"é\"]</arg_value><arg_key>b</arg_key><arg_value>true"
        "</arg_value><arg_key>s</arg_key><arg_value> keep </arg_value><arg_key>none</arg_key><arg_value>null"
        "</arg_value></tool_call>"
    )
    zero_args = [{"role": "assistant", "tool_calls": [{"name": "f", "arguments": "{}"}]}]
    assert render(zero_args, add_generation_prompt=False).endswith("</think><tool_call>f</tool_call>")


def test_thinking_modes_as_template_flags():
    history = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!", "reasoning_content": "greet"},
        {"role": "user", "content": "2+2?"},
    ]
    preserved = render(history, **template_flags(Thinking()))  # the agent's default
    assert "<think>greet</think>Hello!" in preserved and preserved.endswith("<|assistant|><think>")
    cleared = render(history, **template_flags(Thinking(clear_thinking=None)))
    assert "<|assistant|></think>Hello!" in cleared
    assert render(history, **template_flags(Thinking(enabled=False))).endswith("<|assistant|></think>")
    for thinking in (Thinking(), Thinking(enabled=False, clear_thinking=True), Thinking(clear_thinking=None)):
        flags = template_flags(thinking)
        assert render(history, **flags) == jinja_render(history, **flags)


def test_inline_think_before_last_user_is_dropped():
    messages = [
        {"role": "user", "content": "Q1"},
        {"role": "assistant", "content": "<think>\nR1\n</think>\n\nA1"},
        {"role": "user", "content": "Q2"},
    ]
    assert "<|assistant|></think>A1<|user|>Q2" in render(messages)
    assert "<|assistant|><think>R1</think>A1<|user|>Q2" in render(messages, clear_thinking=False)


def test_none_values_count_as_absent():
    """OpenAI clients send content None next to tool calls; the raw template would print 'None'."""
    message = {"role": "assistant", "content": None, "reasoning_content": None, "tool_calls": [{"name": "f", "arguments": {}}]}
    assert render([message], add_generation_prompt=False) == "[gMASK]<sop><|assistant|></think><tool_call>f</tool_call>"
    assert render([{"role": "tool", "content": None}], add_generation_prompt=False) == "[gMASK]<sop><|observation|>"


def test_tool_results_grouping():
    messages = [
        {"role": "tool", "content": "a"},
        {"role": "tool", "content": "b"},
        {"role": "tool", "content": [{"output": "c"}, "d"]},
        {"role": "tool", "content": "e"},
    ]
    assert render(messages, add_generation_prompt=False) == (
        "[gMASK]<sop><|observation|><tool_response>a</tool_response><tool_response>b</tool_response>"
        "<|observation|><tool_response>c</tool_response><tool_response>d</tool_response>"
        "<tool_response>e</tool_response>"
    )


@pytest.mark.parametrize("arguments", ["[1, 2]", "not json", 5])
def test_arguments_that_are_not_an_object_are_refused(arguments):
    message = {"role": "assistant", "tool_calls": [{"name": "f", "arguments": arguments}]}
    with pytest.raises(ValueError, match="arguments"):
        render([message])


def test_reference_environment_matches_transformers():
    """The jinja2 set-up the property test uses is the one transformers renders chat templates with."""
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    from tests.chat_format.reference import TEMPLATE_MISSING, TEMPLATE_PATH, template_messages

    if not TEMPLATE_PATH.exists():
        pytest.skip(TEMPLATE_MISSING)
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Ünïcode 天气 🙂"}, {"type": "image"}]},
        {
            "role": "assistant", "content": "x", "reasoning_content": "r",
            "tool_calls": [{"function": {"name": "f", "arguments": {"a": [1, {"b": "é"}]}}}],
        },
        {"role": "tool", "content": [{"output": "done"}]},
    ]
    rendered, _ = chat_template_utils.render_jinja_template(
        conversations=[template_messages(messages)], tools=[WEATHER_TOOL],
        chat_template=TEMPLATE_PATH.read_text(encoding="utf-8"), add_generation_prompt=True, clear_thinking=False,
    )
    assert rendered[0] == render(messages, [WEATHER_TOOL], clear_thinking=False)
