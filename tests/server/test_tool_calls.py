"""Tool calls and reasoning through `glmcode serve`, on a tiny checkpoint taught two answers.

The checkpoint is trained (briefly, with transformers) to answer a fixed conversation: first
thinking and a read_file call, then, once the tool result is back, thinking and a final answer.
Greedy decoding reproduces them, so the test sees exactly what the server's GLM parser makes of
real model output.
"""

from __future__ import annotations

import json

import pytest

from glmcode.chat_format import render_ids
from glmcode.chat_format.render import _Prompt
from glmcode.engine.tokenizer import Tokenizer
from tests.conftest import load_tiny_checkpoint_writer
from tests.training import teach_answers

from .conftest import Server

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

MODEL = "glm-4.7-flash"
TOOLS = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file.",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}]  # fmt: skip
QUESTION = [{"role": "user", "content": "What does calc.py do?"}]
THINKING_1, THINKING_2 = "I should read the file.", "It subtracts."
CALL = f"{THINKING_1}</think><tool_call>read_file<arg_key>path</arg_key><arg_value>calc.py</arg_value></tool_call><|observation|>"
FILE = "def add(a, b):\n    return a - b\n"
ANSWER = "calc.py defines add, which subtracts instead of adding."
FINAL = f"{THINKING_2}</think>{ANSWER}<|user|>"


def after_the_call(call_id: str, arguments) -> list[dict]:
    return QUESTION + [
        {"role": "assistant", "content": None, "reasoning_content": THINKING_1,
         "tool_calls": [{"id": call_id, "type": "function", "function": {"name": "read_file", "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": FILE},
    ]  # fmt: skip


def template_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Model output text with its special tokens as their ids."""
    prompt = _Prompt()
    prompt.template_text(text)
    return [i for special, piece in prompt.pieces
            for i in ([tokenizer.token_to_id(piece)] if special else tokenizer.encode(piece))]  # fmt: skip


@pytest.fixture(scope="module")
def taught(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("taught")
    random = load_tiny_checkpoint_writer().make_tiny_checkpoint(root / "random", num_hidden_layers=2)
    tokenizer = Tokenizer(random)
    examples = [
        (render_ids(tokenizer, QUESTION, TOOLS), template_ids(tokenizer, CALL)),
        (render_ids(tokenizer, after_the_call("call_1", {"path": "calc.py"}), TOOLS), template_ids(tokenizer, FINAL)),
    ]
    model = teach_answers(random, root / "model", examples)
    server = Server(model, root / "home")
    yield server
    server.stop()


@pytest.fixture
def client(taught):
    return openai.OpenAI(base_url=taught.base_url, api_key="unused", max_retries=0, timeout=120)


def test_a_tool_call_comes_back_as_tool_calls_and_its_result_goes_back_as_a_tool_message(client):
    first = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0)
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == THINKING_1 and not choice.message.content
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "read_file" and call.id
    assert json.loads(call.function.arguments) == {"path": "calc.py"}

    # The SDK's own objects go back as they came (arguments as a JSON string, the call's id).
    history = QUESTION + [choice.message.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": FILE}]  # fmt: skip
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, temperature=0)
    assert second.choices[0].finish_reason == "stop"
    assert second.choices[0].message.content == ANSWER
    assert second.choices[0].message.reasoning_content == THINKING_2


def test_a_streamed_tool_call_arrives_whole_in_one_delta(client):
    chunks = list(client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks if c.choices)
    calls = [call for c in chunks if c.choices for call in (c.choices[0].delta.tool_calls or [])]
    assert reasoning == THINKING_1
    assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "read_file"
    assert json.loads(calls[0].function.arguments) == {"path": "calc.py"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_offers_no_tools(client):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, tool_choice="none",
                                            temperature=0, max_tokens=8)  # fmt: skip
    assert answer.usage.prompt_tokens < client.chat.completions.create(
        model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=1).usage.prompt_tokens


def test_thinking_off_through_chat_template_kwargs(client):
    answer = client.chat.completions.create(model=MODEL, messages=QUESTION, tools=TOOLS, temperature=0, max_tokens=8,
                                            extra_body={"chat_template_kwargs": {"enable_thinking": False}})  # fmt: skip
    assert not getattr(answer.choices[0].message, "reasoning_content", None)
