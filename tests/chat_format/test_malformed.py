"""Malformed output never crashes and never runs a tool by guess."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmcode.chat_format import parse, tags
from glmcode.chat_format.tool_calls import CALL_FORMAT
from glmcode.events import ToolCall, ToolCallError
from tests.chat_format import strategies
from tests.chat_format.corpus import MALFORMED, READ_A, TOOLS


@pytest.mark.parametrize(("output", "expected"), MALFORMED)
def test_malformed_output_becomes_tool_call_errors(output, expected):
    errors = parse(output, TOOLS).errors
    assert [error.name for error in errors] == [name for name, _ in expected]
    for error, (_, fragment) in zip(errors, expected):
        assert fragment in error.message
        assert CALL_FORMAT in error.message or "Expected " in error.message  # tells the model what to write
        assert error.raw and error.raw in output


def test_errors_carry_the_raw_call_and_other_calls_still_run():
    bad = "<tool_call>read_file<arg_key>offset</arg_key><arg_value>x</arg_value></tool_call>"
    parsed = parse("</think>" + bad + READ_A, TOOLS)
    assert [type(event) for event in parsed.events] == [ToolCallError, ToolCall]
    assert parsed.errors[0].raw == bad
    assert parsed.tool_calls == [{"name": "read_file", "arguments": {"path": "a.py"}}]


def test_an_empty_tool_list_refuses_every_call():
    parsed = parse("</think>" + READ_A, [])
    assert parsed.tool_calls == [] and "Available functions: none" in parsed.errors[0].message


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(output=strategies.model_output, thinking=st.booleans())
def test_arbitrary_tag_soup_never_crashes_and_calls_are_only_known_tools(output, thinking):
    parsed = parse(output, TOOLS, thinking=thinking)
    for event in parsed.events:
        if isinstance(event, ToolCall):
            assert event.name in {"read_file", "run"}
            assert event.raw.startswith(tags.TOOL_CALL) and event.raw.endswith(tags.END_TOOL_CALL)
    for delta_text in (parsed.reasoning_content, parsed.content):
        assert tags.TOOL_CALL not in delta_text
