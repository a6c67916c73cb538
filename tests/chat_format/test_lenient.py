"""As forgiving as vLLM's and SGLang's GLM parsers, and no less strict where glmcode does better.

The corpus (lenient_corpus.py) is parsed whole, streamed at every split point and one character
at a time, and its parsed messages render back to text that parses to the same message.
"""

from __future__ import annotations

import json
import warnings

import pytest

from glmcode.chat_format import StreamParser, parse, render, tags
from tests.chat_format.lenient_corpus import CASES, TOOLS, call
from tests.chat_format.test_stream import merged

_IDS = [label for label, _, _ in CASES]


@pytest.mark.parametrize(("label", "output", "expected"), CASES, ids=_IDS)
def test_parse(label, output, expected):
    reasoning, content, calls, errors = expected
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no SyntaxWarning from odd escapes in the model's text
        parsed = parse(output, TOOLS)
    assert parsed.reasoning_content == reasoning
    assert parsed.content == content
    assert [(c["name"], c["arguments"]) for c in parsed.tool_calls] == calls
    assert json.dumps([c["arguments"] for c in parsed.tool_calls]) == json.dumps([a for _, a in calls])  # types too
    assert len(parsed.errors) == len(errors)
    for error, fragment in zip(parsed.errors, errors):
        assert fragment in error.message


def _streamed(pieces):
    parser = StreamParser(TOOLS)
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events + parser.finish()


@pytest.mark.parametrize(("label", "output", "expected"), CASES, ids=_IDS)
def test_streamed_at_every_split_point_and_every_character(label, output, expected):
    whole = merged(parse(output, TOOLS).events)
    for cut in range(len(output) + 1):
        assert merged(_streamed([output[:cut], output[cut:]])) == whole, cut
    for first in range(0, len(output), 7):  # three pieces: every cut pair would be quadratic
        for second in range(first, len(output) + 1, 5):
            pieces = [output[:first], output[first:second], output[second:]]
            assert merged(_streamed(pieces)) == whole, (first, second)
    assert merged(_streamed(list(output))) == whole


@pytest.mark.parametrize(("label", "output", "expected"), CASES, ids=_IDS)
def test_kept_text_renders_back_and_parses_to_the_same_message(label, output, expected):
    parsed = parse(output, TOOLS)
    message = parsed.to_message()
    rendered = render([{"role": "user", "content": "go"}, message], TOOLS, add_generation_prompt=False)
    generation = rendered.split(tags.ASSISTANT)[-1].removeprefix(tags.THINK)
    again = parse(generation, TOOLS)
    assert again.to_message() == message
    assert again.errors == []


def test_content_between_calls_streams_before_the_next_call_closes():
    parser = StreamParser(TOOLS, thinking=False)
    assert parser.feed(call("pick", ("size", "1"))) != []
    assert parser.feed("\\n  \\") == []  # separators (and what may start one) wait
    assert [e.text for e in parser.feed("n Now the ")] == ["Now the"]
    assert [e.text for e in parser.feed("second one.<tool_")] == [" second one."]
    assert len(parser.feed("call>pick</tool_call>")) == 1
    assert parser.finish() == []


# What glmcode keeps doing better than the servers.

def test_declared_strings_are_never_decoded():
    output = "</think>" + call("search_issues", ("query", "null"), ("path", '  "quoted"\n'))
    assert parse(output, TOOLS).tool_calls[0]["arguments"] == {"query": "null", "path": '  "quoted"\n'}


def test_unknown_functions_are_refused_with_the_real_names():
    [error] = parse("</think>" + call("get_weather", ("city", "Paris")), TOOLS).errors
    assert error.message.startswith("Unknown function 'get_weather'. Available functions: search_issues, measure, pick.")


def test_a_literal_newline_after_the_name_is_not_part_of_the_name():
    parsed = parse("</think><tool_call>get_weather\\n<arg_key>city</arg_key><arg_value>x</arg_value></tool_call>", TOOLS)
    assert "Unknown function 'get_weather'." in parsed.errors[0].message  # not 'get_weather\n'


@pytest.mark.parametrize(("pairs", "fragment"), [
    ((("count", "ten"),), "parameter 'count' must be number, got 'ten'"),
    ((("count", "1"), ("steps", "2.5")), "parameter 'steps' must be one of integer, null, got '2.5'"),
    ((("count", "1"), ("ids", "a.py b.py")), "parameter 'ids' must be array, got 'a.py b.py'"),
    ((("count", "1"), ("count", "2")), "argument 'count' is given twice"),
])
def test_wrong_types_are_errors_not_guesses(pairs, fragment):
    [error] = parse("</think>" + call("measure", *pairs), TOOLS).errors
    assert fragment in error.message
