"""StreamParser: the same events however the output is cut, emitted as early as they can be."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from glmcode.chat_format import StreamParser, parse
from glmcode.events import ContentDelta, ReasoningDelta, ToolCall
from tests.chat_format import strategies
from tests.chat_format.corpus import MALFORMED, READ_A, TOOLS, WELL_FORMED
from tests.chat_format.reference import tiny_tokenizer

OUTPUTS = WELL_FORMED + [output for output, _ in MALFORMED]


def merged(events):
    """Adjacent deltas of one kind joined: how the text was cut must not matter."""
    result = []
    for event in events:
        if result and isinstance(event, (ReasoningDelta, ContentDelta)) and type(result[-1]) is type(event):
            result[-1] = type(event)(result[-1].text + event.text)
        else:
            result.append(event)
    return result


def streamed(pieces, thinking=True):
    parser = StreamParser(TOOLS, thinking=thinking)
    events = []
    for piece in pieces:
        events.extend(parser.feed(piece))
    return events + parser.finish()


@pytest.mark.parametrize("thinking", [True, False])
@pytest.mark.parametrize("output", OUTPUTS)
def test_every_split_point_and_every_character_gives_the_parse_events(output, thinking):
    expected = merged(parse(output, TOOLS, thinking=thinking).events)
    for cut in range(len(output) + 1):
        assert merged(streamed([output[:cut], output[cut:]], thinking)) == expected, cut
    assert merged(streamed(list(output), thinking)) == expected


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), output=st.sampled_from(OUTPUTS), thinking=st.booleans())
def test_random_partitions_give_the_parse_events(data, output, thinking):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(output)), max_size=8)))
    pieces = [output[start:end] for start, end in zip([0, *cuts], [*cuts, len(output)])]
    assert merged(streamed(pieces, thinking)) == merged(parse(output, TOOLS, thinking=thinking).events)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), output=strategies.model_output, thinking=st.booleans())
def test_any_output_cut_anywhere_gives_the_parse_events(data, output, thinking):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(output)), max_size=10)))
    pieces = [output[start:end] for start, end in zip([0, *cuts], [*cuts, len(output)])]
    assert merged(streamed(pieces, thinking)) == merged(parse(output, TOOLS, thinking=thinking).events)


@pytest.mark.parametrize("output", WELL_FORMED)
def test_token_by_token_decoding_gives_the_parse_events(output):
    """Deltas as an engine streams them: the text each new token adds, never half a character."""
    tokenizer = tiny_tokenizer()
    ids = tokenizer.encode(output)
    pieces, emitted = [], ""
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end])
        if not text.endswith("\ufffd"):
            pieces.append(text[len(emitted):])
            emitted = text
    assert emitted == output
    assert merged(streamed(pieces)) == merged(parse(output, TOOLS).events)


def test_reasoning_and_content_stream_before_the_end():
    parser = StreamParser(TOOLS)
    assert parser.feed("Let me ") == [ReasoningDelta("Let me")]  # the space waits for what follows
    assert parser.feed("look.") == [ReasoningDelta(" look.")]
    assert parser.feed("</thi") == []
    assert parser.feed("nk>\n\nHere") == [ContentDelta("Here")]
    assert parser.feed(" it is <tool_") == [ContentDelta(" it is")]  # a possible tag is held back
    assert parser.feed("call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value>") == []
    events = parser.feed("</tool_call><|obser")
    assert len(events) == 1 and isinstance(events[0], ToolCall)
    assert events[0].arguments == {"path": "a.py"}
    assert parser.feed("vation|>") == []
    assert parser.finish() == []


def test_a_held_back_partial_tag_that_never_completes_is_text():
    parser = StreamParser(TOOLS, thinking=False)
    assert parser.feed("a <tool_cal") == [ContentDelta("a")]
    assert parser.finish() == [ContentDelta(" <tool_cal")]


def test_tool_call_is_reported_when_it_closes_not_at_finish():
    parser = StreamParser(TOOLS)
    events = parser.feed("ok</think>" + READ_A)
    assert isinstance(events[-1], ToolCall)
    assert parser.finish() == []
