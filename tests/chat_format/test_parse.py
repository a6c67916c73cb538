"""parse(): reasoning, content and typed tool calls from a finished generation."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmcode.chat_format import parse, render, tags
from glmcode.events import ToolCall

READ_FILE = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": {
            "type": "object",
            "properties": {
                "path": {"type": "string"},
                "offset": {"type": "integer"},
                "limit": {"anyOf": [{"type": "integer"}, {"type": "null"}]},
            },
            "required": ["path"],
        },
    },
}
CONFIGURE = {
    "name": "configure",  # a bare function spec, without the {"type": "function"} wrapper
    "parameters": {
        "type": "object",
        "properties": {
            "verbose": {"type": "boolean"},
            "ratio": {"type": "number"},
            "options": {"type": "object"},
            "files": {"type": "array", "items": {"type": "string"}},
            "level": {"type": ["integer", "string"]},
            "note": {"type": ["string", "null"]},
            "mode": {"enum": ["fast", "safe"]},
        },
    },
}
TOOLS = [READ_FILE, CONFIGURE]


def _call(name, **values):
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in values.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


def test_reasoning_content_and_two_calls():
    text = (
        "The user wants a.py and b.py.\n</think>\n\nReading both."
        + _call("read_file", path="a.py") + _call("read_file", path="b.py", offset="10") + "<|observation|>"
    )
    parsed = parse(text, TOOLS)
    assert parsed.reasoning_content == "The user wants a.py and b.py."
    assert parsed.content == "Reading both."
    assert parsed.tool_calls == [
        {"name": "read_file", "arguments": {"path": "a.py"}},
        {"name": "read_file", "arguments": {"path": "b.py", "offset": 10}},
    ]
    assert parsed.errors == []
    assert isinstance(parsed.events[-1], ToolCall) and parsed.events[-1].raw == _call("read_file", path="b.py", offset="10")


def test_a_tool_call_ends_reasoning_without_think_close():
    parsed = parse("I should read it." + _call("read_file", path="a.py"), TOOLS)
    assert parsed.reasoning_content == "I should read it."
    assert parsed.content == ""
    assert parsed.tool_calls == [{"name": "read_file", "arguments": {"path": "a.py"}}]


def test_output_without_think_close_is_all_reasoning():
    assert parse("still thinking <b>").reasoning_content == "still thinking <b>"


def test_thinking_off_output_is_content_from_the_start():
    parsed = parse("Hello!<|user|>", thinking=False)
    assert (parsed.reasoning_content, parsed.content) == ("", "Hello!")
    # a model that opens <think> itself anyway is still understood
    parsed = parse("\n<think>hmm</think>Hi", thinking=False)
    assert (parsed.reasoning_content, parsed.content) == ("hmm", "Hi")


def test_stop_tokens_are_not_content():
    for stop in tags.STOP_TOKENS:
        assert parse(f"r</think>answer{stop}").content == "answer"


def test_zero_argument_call_and_whitespace_around_parts():
    tools = [{"type": "function", "function": {"name": "git_status", "parameters": {"type": "object", "properties": {}}}}]
    assert parse("</think><tool_call>git_status</tool_call>", tools).tool_calls == [{"name": "git_status", "arguments": {}}]
    text = "</think><tool_call>\nread_file\n<arg_key> path </arg_key>\n<arg_value>a.py</arg_value>\n</tool_call>"
    assert parse(text, TOOLS).tool_calls == [{"name": "read_file", "arguments": {"path": "a.py"}}]


def test_declared_strings_stay_raw_and_unstripped():
    parsed = parse("</think>" + _call("read_file", path="  src/ a.py\n", offset=" 3 "), TOOLS)
    assert parsed.tool_calls[0]["arguments"] == {"path": "  src/ a.py\n", "offset": 3}
    # even text that looks like JSON stays a string when the schema says string
    assert parse("</think>" + _call("read_file", path="123"), TOOLS).tool_calls[0]["arguments"] == {"path": "123"}


def test_values_typed_from_the_schema():
    text = "</think>" + _call(
        "configure", verbose="True", ratio="0.5", options='{"a": [1, 2]}', files="['a.py', 'b.py']",
        level="3", note="null", mode="fast",
    )
    assert parse(text, TOOLS).tool_calls[0]["arguments"] == {
        "verbose": True, "ratio": 0.5, "options": {"a": [1, 2]}, "files": ["a.py", "b.py"],
        "level": 3, "note": None, "mode": "fast",
    }
    text = "</think>" + _call("configure", level="high", note="null pointer", ratio="2")
    assert parse(text, TOOLS).tool_calls[0]["arguments"] == {"level": "high", "note": "null pointer", "ratio": 2}
    assert parse("</think>" + _call("read_file", path="a", offset="5.0", limit="null"), TOOLS).tool_calls[0]["arguments"] == {
        "path": "a", "offset": 5, "limit": None,
    }


def test_without_tools_any_name_is_accepted_and_values_decoded_as_json_when_they_are():
    parsed = parse("</think>" + _call("anything", n="42", s="hello", d='{"k": true}', lit="(1, 2)"))
    assert parsed.tool_calls == [{"name": "anything", "arguments": {"n": 42, "s": "hello", "d": {"k": True}, "lit": [1, 2]}}]


def test_parsed_message_renders_back_to_the_generation():
    generation = "Need the file.</think>Reading." + _call("read_file", path="a.py", offset="2")
    message = parse(generation, TOOLS).to_message()
    rendered = render([{"role": "user", "content": "go"}, message], [READ_FILE], add_generation_prompt=False)
    assert rendered.endswith("<|assistant|><think>" + generation)


# Round trip: the template renders an assistant tool call; parsing that text gives the call back.

_KEYS = (
    st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="<>"), min_size=1, max_size=8)
    .map(str.strip)
    .filter(lambda key: key and not any(tag in key for tag in tags.TEMPLATE_TOKENS))
)
_STRINGS = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).filter(lambda s: tags.END_ARG_VALUE not in s)
_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), _STRINGS)
_JSON = st.recursive(
    _SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(_STRINGS, inner, max_size=3)),
    max_leaves=6,
)
_SCHEMA_TYPES = {
    type(None): "null", bool: "boolean", int: "integer", float: "number", str: "string", list: "array", dict: "object",
}


def _schema_for(arguments):
    properties = {key: {"type": _SCHEMA_TYPES[type(value)]} for key, value in arguments.items()}
    return {"type": "object", "properties": properties, "required": list(arguments)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    calls=st.lists(
        st.tuples(st.sampled_from(["read_file", "edit_file", "run", "工具"]), st.dictionaries(_KEYS, _JSON, max_size=4)),
        min_size=1, max_size=3, unique_by=lambda call: call[0],
    ),
    reasoning=_STRINGS.filter(lambda s: not any(t in s for t in tags.TEMPLATE_TOKENS + tags.STOP_TOKENS)),
    content=_STRINGS.filter(lambda s: not any(t in s for t in tags.TEMPLATE_TOKENS + tags.STOP_TOKENS)),
    json_string_arguments=st.booleans(),
)
def test_round_trip_render_then_parse(calls, reasoning, content, json_string_arguments):
    tools = [{"type": "function", "function": {"name": name, "parameters": _schema_for(args)}} for name, args in calls]
    message = {
        "role": "assistant",
        "reasoning_content": reasoning,
        "content": content,
        "tool_calls": [
            {"type": "function", "function": {"name": name, "arguments": json.dumps(args) if json_string_arguments else args}}
            for name, args in calls
        ],
    }
    rendered = render([{"role": "user", "content": "go"}, message], tools, add_generation_prompt=False)
    generation = rendered.split(tags.ASSISTANT)[-1]
    parsed = parse(generation, tools)
    assert parsed.errors == []
    assert parsed.reasoning_content == reasoning.strip()
    assert parsed.content == content.strip()
    assert [call["name"] for call in parsed.tool_calls] == [name for name, _ in calls]
    for (_, expected), call in zip(calls, parsed.tool_calls):
        assert json.dumps(call["arguments"]) == json.dumps(expected)  # same values, types, key order

