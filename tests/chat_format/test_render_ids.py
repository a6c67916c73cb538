"""render_ids(): the rendered prompt as ids, special tokens by id, and its prefix stability."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from glmcode.chat_format import parse, render, render_ids, tags
from glmcode.errors import CheckpointError
from tests.chat_format import strategies
from tests.chat_format.reference import tiny_tokenizer


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(messages=strategies.messages, tools=strategies.tools, flags=strategies.flags)
def test_ids_decode_to_the_rendered_text_and_match_whole_text_tokenization(messages, tools, flags):
    tokenizer = tiny_tokenizer()
    ids = render_ids(tokenizer, messages, tools, **flags)
    text = render(messages, tools, **flags)
    assert tokenizer.decode(ids) == text
    # A Hugging Face tokenizer splits on added tokens first, so this is what apply_chat_template gives.
    assert ids == tokenizer.encode(text)


class _StrictTokenizer:
    """Refuses to tokenize the text of a special token: render_ids must look those up by id."""

    def __init__(self):
        self.inner = tiny_tokenizer()

    def encode(self, text):
        assert not any(token in text for token in tags.TEMPLATE_TOKENS), text
        return self.inner.encode(text)

    def token_to_id(self, token):
        return self.inner.token_to_id(token)


def test_special_tokens_are_inserted_by_id():
    tokenizer = tiny_tokenizer()
    tool = {"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Read a.py"},
        {"role": "assistant", "reasoning_content": "r", "tool_calls": [{"name": "read_file", "arguments": {"path": "a.py"}}]},
        {"role": "tool", "content": "print(1)"},
    ]
    ids = render_ids(_StrictTokenizer(), messages, [tool])
    for token in (tags.GMASK, tags.SOP, tags.SYSTEM, tags.USER, tags.ASSISTANT, tags.TOOL_CALL, tags.ARG_VALUE, tags.OBSERVATION):
        assert tokenizer.token_to_id(token) in ids
    assert ids[:2] == [tokenizer.token_to_id(tags.GMASK), tokenizer.token_to_id(tags.SOP)]
    assert ids[-2:] == [tokenizer.token_to_id(tags.ASSISTANT), tokenizer.token_to_id(tags.THINK)]


def test_a_tokenizers_library_tokenizer_works_directly():
    messages = [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "x", "reasoning_content": "r"}]
    wrapper = tiny_tokenizer()
    assert render_ids(wrapper.tokenizer, messages) == render_ids(wrapper, messages)


def test_a_tokenizer_without_glm_special_tokens_is_a_clear_error():
    class PlainTokenizer:
        def encode(self, text):
            return [ord(c) for c in text]

        def token_to_id(self, token):
            return None

    with pytest.raises(CheckpointError, match=r"no \[gMASK\] token"):
        render_ids(PlainTokenizer(), [{"role": "user", "content": "hi"}])


def _ids(tokenizer, *pieces):
    """Ids of a generated sequence: special tokens by id, text encoded."""
    ids = []
    for piece in pieces:
        token_id = tokenizer.token_to_id(piece)
        ids.extend([token_id] if token_id is not None else tokenizer.encode(piece))
    return ids


def test_preserved_thinking_only_appends_across_user_turns():
    tokenizer = tiny_tokenizer()
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    first = render_ids(tokenizer, history, clear_thinking=False)
    # The model writes its reasoning, </think>, the answer, and stops on <|user|>.
    generated = _ids(tokenizer, "Add them.", tags.END_THINK, "4", tags.USER)
    answer = parse("Add them.</think>4<|user|>").to_message()
    second = render_ids(tokenizer, history + [answer, {"role": "user", "content": "And 3+3?"}], clear_thinking=False)
    assert second[: len(first) + len(generated)] == first + generated


def test_default_mode_drops_old_reasoning_at_a_new_user_message():
    tokenizer = tiny_tokenizer()
    history = [{"role": "user", "content": "What is 2+2?"}]
    first = render_ids(tokenizer, history)
    answer = parse("Add them.</think>4").to_message()
    second = render_ids(tokenizer, history + [answer, {"role": "user", "content": "And 3+3?"}])
    # The old turn's <think>reasoning</think> becomes a bare </think>: the prefix holds up to <|assistant|>.
    assert second[: len(first) - 1] == first[:-1]
    assert first[-1] == tokenizer.token_to_id(tags.THINK)
    assert second[len(first) - 1] == tokenizer.token_to_id(tags.END_THINK)


@pytest.mark.parametrize("clear_thinking", [None, True, False])
def test_tool_loop_steps_only_append_in_every_mode(clear_thinking):
    tokenizer = tiny_tokenizer()
    parameters = {"type": "object", "properties": {"path": {"type": "string"}}}
    tool = {"type": "function", "function": {"name": "read_file", "parameters": parameters}}
    history = [{"role": "user", "content": "Fix a.py"}]
    first = render_ids(tokenizer, history, [tool], clear_thinking=clear_thinking)
    raw = (
        "Read it first.</think><tool_call>read_file<arg_key>path</arg_key><arg_value>a.py</arg_value></tool_call>"
        "<|observation|>"
    )
    generated = _ids(
        tokenizer,
        "Read it first.", tags.END_THINK, tags.TOOL_CALL, "read_file", tags.ARG_KEY, "path", tags.END_ARG_KEY,
        tags.ARG_VALUE, "a.py", tags.END_ARG_VALUE, tags.END_TOOL_CALL, tags.OBSERVATION,
    )
    step = parse(raw, [tool]).to_message()
    second = render_ids(tokenizer, history + [step, {"role": "tool", "content": "x = 1"}], [tool], clear_thinking=clear_thinking)
    assert second[: len(first) + len(generated)] == first + generated


def test_turn_level_thinking_off_only_appends_with_preserved_thinking():
    tokenizer = tiny_tokenizer()
    history = [{"role": "user", "content": "hi"}]
    first = render_ids(tokenizer, history, enable_thinking=False, clear_thinking=False)
    assert first[-1] == tokenizer.token_to_id(tags.END_THINK)
    answer = parse("Hello!", thinking=False).to_message()
    second = render_ids(tokenizer, history + [answer, {"role": "user", "content": "bye"}], clear_thinking=False)
    generated = _ids(tokenizer, "Hello!", tags.USER)
    assert second[: len(first) + len(generated)] == first + generated
