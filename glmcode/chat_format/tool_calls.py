"""One `<tool_call>...</tool_call>` block of model output, to a ToolCall or a ToolCallError.

Accepted: `<tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>...</tool_call>`,
with separators allowed around the name, the keys and between the tags (the template writes
none): whitespace, and the two characters `\n` that GLM sometimes writes there instead of a
newline. Anything else is an error whose message tells the model what was wrong and what to
write.
"""

from __future__ import annotations

import json
import re
from typing import Any

from glmcode.chat_format import tags
from glmcode.chat_format.arguments import ArgumentError, preview, type_arguments
from glmcode.chat_format.schema import ObjectSchema
from glmcode.events import ToolCall, ToolCallError

CALL_FORMAT = (
    "Write each call as <tool_call>NAME<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>"
    "...</tool_call>, one <arg_key>/<arg_value> pair per argument, and nothing between calls."
)


class _SyntaxProblem(ValueError):
    pass


def parse_tool_call(raw: str, schemas: dict[str, dict[str, Any]] | None) -> ToolCall | ToolCallError:
    """A complete block, from <tool_call> to </tool_call>. schemas None: any function name."""
    body = raw[len(tags.TOOL_CALL) : -len(tags.END_TOOL_CALL)]
    name = function_name(body)
    if name is None:
        written = strip_separators(_name_text(body))
        problem = f"invalid function name {preview(written)}" if written else "the function name is missing"
        return syntax_error(raw, f"{problem}; write the name right after <tool_call>")
    if schemas is not None and name not in schemas:
        available = ", ".join(schemas) or "none"
        message = f"Unknown function '{name}'. Available functions: {available}. {CALL_FORMAT}"
        return ToolCallError(raw=raw, message=message, name=name)
    try:
        pairs = _argument_pairs(body[len(_name_text(body)) :])
    except _SyntaxProblem as problem:
        return syntax_error(raw, str(problem), name)
    parameters = None if schemas is None else schemas[name]
    try:
        arguments = type_arguments(pairs, parameters)
    except ArgumentError as problem:
        message = f"Invalid arguments for {name}: {problem}. Expected {signature(name, parameters)}."
        return ToolCallError(raw=raw, message=message, name=name)
    return ToolCall(name=name, arguments=arguments, raw=raw)


def unterminated_error(raw: str, in_value: bool, interrupted: bool = False) -> ToolCallError:
    """A call the output left open: at the end of the stream, or when a new <tool_call> began."""
    if interrupted:
        problem = "a new <tool_call> began before this call was closed with </tool_call>"
    elif in_value:
        problem = "the output ended inside an argument value: close it with </arg_value>, then </tool_call>"
    else:
        problem = "the output ended before the call was closed with </tool_call>"
    return syntax_error(raw, problem, function_name(raw[len(tags.TOOL_CALL) :]))


def syntax_error(raw: str, problem: str, name: str | None = None) -> ToolCallError:
    subject = f"tool call to {name}" if name else "tool call"
    return ToolCallError(raw=raw, message=f"Malformed {subject}: {problem}. {CALL_FORMAT}", name=name)


def function_name(body: str) -> str | None:
    """The stripped function name at the start of a call body, if it is a plausible name."""
    name = strip_separators(_name_text(body))
    if not name or any(c.isspace() or c in "<>" for c in name):
        return None
    return name


def signature(name: str, parameters: dict[str, Any] | None) -> str:
    """`name(path: string, limit?: integer, mode?: "fast"|"safe")`, the call shape a schema asks for."""
    schema = ObjectSchema.of(parameters or {})
    shown = []
    for key in schema.properties:
        types, choices = schema.allowed_types(key), schema.choices(key)
        if choices is not None:
            type_text = "|".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
        else:
            type_text = "|".join(sorted(types)) if types else "any"
        shown.append(f"{key}{'' if key in schema.required else '?'}: {type_text}")
    return f"{name}({', '.join(shown)})"


_SEPARATORS = re.compile(r"(?:\s|\\n)+")


def strip_separators(text: str) -> str:
    """Text without the whitespace and literal `\\n` around it."""
    start = skip_separators(text, 0)
    end = len(text)
    while end > start and (text[end - 1].isspace() or text.endswith("\\n", start, end)):
        end -= 1 if text[end - 1].isspace() else 2
    return text[start:end]


def skip_separators(text: str, position: int) -> int:
    """The first position at or after `position` that is not a separator."""
    match = _SEPARATORS.match(text, position)
    return match.end() if match else position


def _name_text(body: str) -> str:
    return body[: _next_tag(body, 0)]


def _argument_pairs(text: str) -> list[tuple[str, str]]:
    pairs: list[tuple[str, str]] = []
    position = skip_separators(text, 0)
    while position < len(text):
        if not text.startswith(tags.ARG_KEY, position):
            unexpected = text[position : _next_tag(text, position + 1)].rstrip()
            where = "where <arg_key> or </tool_call> belongs"
            raise _SyntaxProblem(f"unexpected text {preview(unexpected)} {where}")
        key_start = position + len(tags.ARG_KEY)
        key_end = text.find(tags.END_ARG_KEY, key_start)
        if key_end < 0:
            raise _SyntaxProblem("an <arg_key> is not closed with </arg_key>")
        key = text[key_start:key_end].strip()
        if not key or any(tag in key for tag in tags.TEMPLATE_TOKENS):
            raise _SyntaxProblem(f"invalid argument name {preview(key)}")
        value_tag = skip_separators(text, key_end + len(tags.END_ARG_KEY))
        if not text.startswith(tags.ARG_VALUE, value_tag):
            raise _SyntaxProblem(f"<arg_value> must follow </arg_key> of '{key}'")
        value_start = value_tag + len(tags.ARG_VALUE)
        value_end = text.find(tags.END_ARG_VALUE, value_start)
        if value_end < 0:
            raise _SyntaxProblem(f"the value of '{key}' is not closed with </arg_value>")
        if any(key == seen for seen, _ in pairs):
            raise _SyntaxProblem(f"argument '{key}' is given twice")
        pairs.append((key, text[value_start:value_end]))
        position = skip_separators(text, value_end + len(tags.END_ARG_VALUE))
    return pairs


def _next_tag(text: str, start: int) -> int:
    """Where the first tag at or after start begins (len(text) if none)."""
    found = [text.find(tag, start) for tag in tags.TEMPLATE_TOKENS]
    return min((position for position in found if position >= 0), default=len(text))

