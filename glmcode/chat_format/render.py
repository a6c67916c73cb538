"""GLM-4.7 prompt rendering, as text and as token ids, without jinja.

`render` reproduces the official chat template (`chat_template.jinja` of GLM-4.7-Flash, rendered
by jinja2 with trim_blocks and lstrip_blocks, `tojson` without ASCII escaping) byte for byte.
Inputs are handled the way `transformers.apply_chat_template` hands them to the template:

- a message key whose value is None counts as absent (OpenAI clients send `content: None`
  beside tool calls; the raw template would print "None" there);
- tool-call `arguments` may be a dict or a JSON-object string (parsed first; the template itself
  only accepts a dict); None or "" means no arguments;
- anything else nested inside a message renders as jinja prints it (`str()` of the value).

`render_ids` builds the same prompt as token ids: every special token the template writes is
looked up by its string with `tokenizer.token_to_id`, and only the text between them goes
through `tokenizer.encode`, so user text can never forge the prompt's structure by accident
and the ids equal what a Hugging Face tokenizer gives for the whole rendered string.

Prefix stability (what the engine's prefix cache sees from one request to the next):

- Within one user turn (assistant tool call, tool results, next step) the history only grows
  at the end, in every mode: reasoning after the last user message is always re-rendered
  (interleaved thinking).
- With preserved thinking (`clear_thinking=False`) a new user turn also only appends: the
  previous prompt's ids are a prefix of the next one's.
- With the default (`clear_thinking=None` or True) a new user message drops the reasoning of
  every earlier assistant message: their `<think>...</think>` becomes a bare `</think>`, so the
  new prompt diverges from the old one at the first assistant message that had reasoning.
- Reasoning and content are re-rendered stripped, so the re-rendered assistant turn only
  matches the generated tokens when the model produced no outer whitespace there.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from glmcode.chat_format import tags
from glmcode.errors import CheckpointError

_TOOLS_HEADER = (
    "\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
_TOOLS_FOOTER = (
    "</tools>\n\nFor each function call, output the function name and arguments within the "
    "following XML format:\n<tool_call>{function-name}<arg_key>{arg-key-1}</arg_key><arg_value>"
    "{arg-value-1}</arg_value><arg_key>{arg-key-2}</arg_key><arg_value>{arg-value-2}</arg_value>"
    "...</tool_call>"
)
_TEMPLATE_TOKEN_PATTERN = re.compile("|".join(re.escape(token) for token in tags.TEMPLATE_TOKENS))


class Tokenizer(Protocol):
    def encode(self, text: str) -> Any: ...

    def token_to_id(self, token: str) -> int | None: ...


class _Prompt:
    """The rendered prompt as a list of pieces: (is_special_token, text)."""

    def __init__(self) -> None:
        self.pieces: list[tuple[bool, str]] = []

    def special(self, token: str) -> None:
        self.pieces.append((True, token))

    def text(self, text: str) -> None:
        if text:
            self.pieces.append((False, text))

    def template_text(self, text: str) -> None:
        """Literal template text, in which the special-token strings are special tokens."""
        start = 0
        for match in _TEMPLATE_TOKEN_PATTERN.finditer(text):
            self.text(text[start : match.start()])
            self.special(match.group())
            start = match.end()
        self.text(text[start:])


def render(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    clear_thinking: bool | None = None,
) -> str:
    """The prompt text. clear_thinking=None leaves the template variable undefined."""
    prompt = _build(messages, tools, add_generation_prompt, enable_thinking, clear_thinking)
    return "".join(text for _, text in prompt.pieces)


def render_ids(
    tokenizer: Tokenizer,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
    *,
    add_generation_prompt: bool = True,
    enable_thinking: bool = True,
    clear_thinking: bool | None = None,
) -> list[int]:
    """The prompt as token ids; `render` of the same arguments decodes to the same text."""
    prompt = _build(messages, tools, add_generation_prompt, enable_thinking, clear_thinking)
    ids: list[int] = []
    text_run: list[str] = []
    for is_special, text in prompt.pieces:
        if not is_special:
            text_run.append(text)
            continue
        if text_run:
            ids.extend(_encode(tokenizer, "".join(text_run)))
            text_run.clear()
        ids.append(_special_id(tokenizer, text))
    if text_run:
        ids.extend(_encode(tokenizer, "".join(text_run)))
    return ids


def _encode(tokenizer: Tokenizer, text: str) -> list[int]:
    encoded = tokenizer.encode(text)
    return list(getattr(encoded, "ids", encoded))  # a `tokenizers.Tokenizer` returns an Encoding


def _special_id(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.token_to_id(token)
    if token_id is None:
        raise CheckpointError(f"the tokenizer has no {token} token: it is not a GLM-4.7 tokenizer")
    return token_id


def _build(
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]] | None,
    add_generation_prompt: bool,
    enable_thinking: bool,
    clear_thinking: bool | None,
) -> _Prompt:
    prompt = _Prompt()
    prompt.special(tags.GMASK)
    prompt.special(tags.SOP)
    if tools:
        _tools_block(prompt, tools)
    messages = [{key: value for key, value in m.items() if value is not None} for m in messages]
    last_user_index = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    keep_all_reasoning = clear_thinking is not None and not clear_thinking
    for index, message in enumerate(messages):
        role = message.get("role")
        if role == "user":
            prompt.special(tags.USER)
            prompt.text(_visible_text(message.get("content")))
        elif role == "assistant":
            _assistant(prompt, message, keep_reasoning=keep_all_reasoning or index > last_user_index)
        elif role == "tool":
            follows_tool = index > 0 and messages[index - 1].get("role") == "tool"
            _tool(prompt, message.get("content"), follows_tool)
        elif role == "system":
            prompt.special(tags.SYSTEM)
            prompt.text(_visible_text(message.get("content")))
    if add_generation_prompt:
        prompt.special(tags.ASSISTANT)
        prompt.special(tags.END_THINK if enable_thinking is not None and not enable_thinking else tags.THINK)
    return prompt


def _tools_block(prompt: _Prompt, tools: list[dict[str, Any]]) -> None:
    prompt.special(tags.SYSTEM)
    prompt.template_text(_TOOLS_HEADER)
    for tool in tools:
        prompt.text(json.dumps(tool, ensure_ascii=False) + "\n")
    prompt.template_text(_TOOLS_FOOTER)


def _assistant(prompt: _Prompt, message: dict[str, Any], keep_reasoning: bool) -> None:
    content = _visible_text(message.get("content"))
    reasoning = message.get("reasoning_content")
    if not isinstance(reasoning, str):
        reasoning = ""
        if tags.END_THINK in content:
            before_end = content.split(tags.END_THINK)[0].rstrip("\n")
            reasoning = before_end.split(tags.THINK)[-1].lstrip("\n")
            content = content.split(tags.END_THINK)[-1].lstrip("\n")
    prompt.special(tags.ASSISTANT)
    if keep_reasoning and reasoning:
        prompt.special(tags.THINK)
        prompt.text(reasoning.strip())
    prompt.special(tags.END_THINK)
    prompt.text(content.strip())
    for call in message.get("tool_calls") or ():
        _tool_call(prompt, call)


def _tool_call(prompt: _Prompt, call: Mapping[str, Any]) -> None:
    function = call.get("function") or call
    prompt.special(tags.TOOL_CALL)
    prompt.text(str(function["name"]))
    for key, value in _arguments(function.get("arguments")).items():
        prompt.special(tags.ARG_KEY)
        prompt.text(str(key))
        prompt.special(tags.END_ARG_KEY)
        prompt.special(tags.ARG_VALUE)
        prompt.text(value if isinstance(value, str) else json.dumps(value, ensure_ascii=False))
        prompt.special(tags.END_ARG_VALUE)
    prompt.special(tags.END_TOOL_CALL)


def _arguments(arguments: Any) -> Mapping[str, Any]:
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError as error:
            raise ValueError(f"tool call arguments are not valid JSON: {error}") from None
    if not isinstance(arguments, Mapping):
        raise ValueError(f"tool call arguments must be a JSON object, got {type(arguments).__name__}")
    return arguments


def _tool(prompt: _Prompt, content: Any, follows_tool: bool) -> None:
    if isinstance(content, str):
        if not follows_tool:
            prompt.special(tags.OBSERVATION)
        _tool_response(prompt, content)
        return
    # A list of results always opens its own observation, even right after another tool message.
    prompt.special(tags.OBSERVATION)
    for result in content if content is not None else ():
        has_output = isinstance(result, Mapping) and "output" in result
        _tool_response(prompt, str(result["output"] if has_output else result))  # as {{ }} prints it


def _tool_response(prompt: _Prompt, text: str) -> None:
    prompt.special(tags.TOOL_RESPONSE)
    prompt.text(text)
    prompt.special(tags.END_TOOL_RESPONSE)


def _visible_text(content: Any) -> str:
    """The template's visible_text macro: text parts joined, other parts (images...) dropped."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Iterable) and not isinstance(content, Mapping):
        return "".join(_part_text(part) for part in content)
    return str(content)


def _part_text(part: Any) -> str:
    if isinstance(part, Mapping) and part.get("type") == "text":
        return str(part["text"]) if "text" in part else ""  # a missing key prints nothing
    return part if isinstance(part, str) else ""
