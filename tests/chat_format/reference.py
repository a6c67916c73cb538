"""Test helpers: the official template through jinja2, and a small GLM-style BPE tokenizer."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest

from glmcode.chat_format import tags

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE_PATH = REPO_ROOT.parent / "shared" / "reference" / "glm47-flash-chat-template.jinja"
TEMPLATE_MISSING = (
    f"the official GLM-4.7 chat template is not at {TEMPLATE_PATH}: to run this test, save the "
    "chat_template.jinja of zai-org/GLM-4.7-Flash (byte for byte) there, in a shared/reference/ "
    "folder beside this checkout"
)


@functools.cache
def _official_template():
    if not TEMPLATE_PATH.exists():
        pytest.skip(TEMPLATE_MISSING)
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    # The environment transformers builds for chat templates (utils/chat_template_utils.py).
    environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    environment.filters["tojson"] = tojson
    return environment.from_string(TEMPLATE_PATH.read_text(encoding="utf-8"))


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the template receives them: None-valued keys dropped (as transformers does),
    tool-call arguments as dicts (the template cannot take a JSON string)."""
    prepared = []
    for message in messages:
        message = {key: value for key, value in message.items() if value is not None}
        if message.get("tool_calls"):
            message["tool_calls"] = [_dict_arguments(call) for call in message["tool_calls"]]
        prepared.append(message)
    return prepared


def _dict_arguments(call: dict[str, Any]) -> dict[str, Any]:
    if "function" in call:
        return {**call, "function": _dict_arguments(call["function"])}
    if isinstance(call.get("arguments"), str):
        return {**call, "arguments": json.loads(call["arguments"])}
    return call


def jinja_render(messages, tools=None, *, add_generation_prompt=True, enable_thinking=True, clear_thinking=None) -> str:
    """The official template rendered by jinja2; clear_thinking=None leaves it undefined."""
    variables: dict[str, Any] = {"enable_thinking": enable_thinking}
    if clear_thinking is not None:
        variables["clear_thinking"] = clear_thinking
    return _official_template().render(
        messages=template_messages(messages), tools=tools, add_generation_prompt=add_generation_prompt, **variables
    )


GLM_SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", tags.THINK, tags.END_THINK, tags.TOOL_CALL, tags.END_TOOL_CALL,
    tags.TOOL_RESPONSE, tags.END_TOOL_RESPONSE, tags.ARG_KEY, tags.END_ARG_KEY, tags.ARG_VALUE,
    tags.END_ARG_VALUE, "/nothink",
]
_GLM_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TRAINING_TEXT = [
    "The user wants the weather in Beijing; call get_weather with city and days.",
    'def read_file(path: str) -> str:\n    """Read a file."""\n    return open(path).read()\n',
    '{"type": "function", "function": {"name": "edit_file", "parameters": {"type": "object"}}}',
    "You may call one or more functions to assist with the user query. 天气 北京 上海 ünïcödé 🙂",
]


class TinyTokenizer:
    """A byte-level BPE in GLM-4.7's layout (Qwen2-style split, GLM special tokens as added tokens)."""

    def __init__(self) -> None:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_GLM_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
        )
        tokenizer.train_from_iterator(_TRAINING_TEXT * 4, trainer)
        tokenizer.add_special_tokens(GLM_SPECIAL_TOKENS)
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


@functools.cache
def tiny_tokenizer() -> TinyTokenizer:
    return TinyTokenizer()
