"""Typing raw `<arg_value>` text with the tool's JSON schema.

The model writes every value as text: strings raw, everything else as JSON. A parameter whose
schema allows only "string" keeps its text exactly (no stripping: indentation matters in code
edits). Any other value is read, in order of preference, as:

- JSON (`json.loads`); a quoted number (`"42"`) given where a number is asked for is that number;
- backslash-escaped JSON (`[{\\"id\\": 1}]`, as GLM sometimes writes arrays and objects);
- a Python literal (the model sometimes writes `True` or single-quoted dicts); a number only
  in Python's spelling (`0x10`, `123_456`) counts only where the schema asks for a number and
  not for a string, so such text otherwise stays text;
- the raw text itself, where the schema allows a string (or does not say).

The first reading the schema accepts (type and allowed values, through `$ref`, unions and
intersections, see schema.py) wins: `7` for an enum `["7", 8]` is the string "7". Nothing is
guessed: a value no reading fits is an ArgumentError whose message tells the model what the
parameter takes. Checked besides: required parameters and, where `additionalProperties` is
false, unknown ones.
"""

from __future__ import annotations

import ast
import json
import warnings
from collections.abc import Iterator
from typing import Any

from glmcode.chat_format.schema import ObjectSchema, json_type

_NUMBERS = frozenset({"integer", "number"})


class ArgumentError(ValueError):
    """Arguments that do not fit the schema; the message is written for the model."""


def tool_parameters(tools: list[dict[str, Any]] | None) -> dict[str, dict[str, Any]] | None:
    """Map each tool name to its parameters schema (None: no tools given, accept any call)."""
    if tools is None:
        return None
    schemas = {}
    for tool in tools:
        function = tool.get("function", tool)
        schemas[function["name"]] = function.get("parameters") or {}
    return schemas


def type_arguments(pairs: list[tuple[str, str]], parameters: dict[str, Any] | None) -> dict[str, Any]:
    """Typed arguments from (key, raw value) pairs; raises ArgumentError."""
    schema = ObjectSchema.of(parameters or {})
    arguments = {}
    for key, raw in pairs:
        if schema.closed and key not in schema.properties:
            expected = ", ".join(schema.properties) or "none"
            raise ArgumentError(f"unknown parameter '{key}' (parameters: {expected})")
        arguments[key] = _typed_value(schema, key, raw)
    missing = [name for name in schema.required if name not in arguments]
    if missing:
        raise ArgumentError("missing required parameter " + ", ".join(f"'{name}'" for name in missing))
    return arguments


def _typed_value(schema: ObjectSchema, key: str, raw: str) -> Any:
    types = schema.allowed_types(key)
    for value in _candidates(raw, types):
        if schema.validates(key, value):
            return _normalized(value, types)
    raise ArgumentError(_mismatch(schema, key, raw, types))


def _candidates(raw: str, types: set[str] | None) -> list[Any]:
    """The values to try, best first. Where the schema allows a string, the raw text comes
    before any other string reading (`"x"` quoted stays as written unless only "x" fits)."""
    if types == {"string"}:
        return [raw]
    readings = list(_readings(raw, types))
    if types is None:
        return [*readings, raw]
    others = [value for value in readings if not isinstance(value, str)]
    strings = [value for value in readings if isinstance(value, str)]
    return [*others, *([raw] if "string" in types else []), *strings]


def _readings(raw: str, types: set[str] | None) -> Iterator[Any]:
    """What raw text may spell besides itself."""
    text = raw.strip()
    wants_number = types is not None and bool(types & _NUMBERS) and "string" not in types
    decoded = _json(text)
    if decoded is not _MISSING:
        if isinstance(decoded, str) and wants_number:
            number = _json(decoded.strip())
            if json_type(number) in _NUMBERS:
                yield number
        yield decoded
        return
    if "\\" in text:
        unescaped = _json(_json('"' + text + '"'))
        if isinstance(unescaped, (list, dict)):
            yield unescaped
            return
    literal = _python_literal(text)
    if literal is not _MISSING and (json_type(literal) not in _NUMBERS or wants_number):
        yield literal


_MISSING = object()


def _json(text: Any) -> Any:
    if not isinstance(text, str):
        return _MISSING
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _MISSING


def _python_literal(text: str) -> Any:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # invalid escapes such as '\d' in the model's text
            value = ast.literal_eval(text)
        return json.loads(json.dumps(value))  # tuples become lists; sets, bytes, complex are refused
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _normalized(value: Any, types: set[str] | None) -> Any:
    """5.0 given for an integer-only parameter becomes 5."""
    if isinstance(value, float) and types is not None and "number" not in types and value.is_integer():
        return int(value)
    return value


def _mismatch(schema: ObjectSchema, key: str, raw: str, types: set[str] | None) -> str:
    choices = schema.choices(key)
    if choices is not None:
        allowed = ", ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
        given = json.dumps(raw if types == {"string"} else (_candidates(raw, types) or [raw])[0], ensure_ascii=False)[:60]
        return f"parameter '{key}' must be one of {allowed}, got {given}"
    expected = describe_types(types) if types else "a value its schema allows"
    return f"parameter '{key}' must be {expected}, got {preview(raw)}"


def describe_types(types: set[str]) -> str:
    names = sorted(types)
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def preview(text: str, limit: int = 60) -> str:
    """Text quoted for an error message, cut to a readable length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")

