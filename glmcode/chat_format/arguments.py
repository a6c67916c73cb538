"""Typing raw `<arg_value>` text with the tool's JSON schema.

The model writes every value as text: strings raw, everything else as JSON. A parameter whose
schema allows only "string" keeps its text exactly (no stripping: indentation matters in code
edits). Any other value is decoded with `json.loads`, then as a Python literal (the model
sometimes writes `True` or single-quoted dicts), and checked against the declared types; a
parameter that also allows "string" falls back to the raw text. Checked: the top-level type,
`enum`/`const`, required parameters and, where `additionalProperties` is false, unknown ones.
Not followed: `$ref`, `allOf`, and the schemas of nested items and properties.
"""

from __future__ import annotations

import ast
import json
from typing import Any

_MISSING = object()


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
    parameters = parameters or {}
    properties = parameters.get("properties") or {}
    closed = parameters.get("additionalProperties") is False
    arguments = {}
    for key, raw in pairs:
        if closed and key not in properties:
            expected = ", ".join(properties) or "none"
            raise ArgumentError(f"unknown parameter '{key}' (parameters: {expected})")
        arguments[key] = _typed_value(key, raw, properties.get(key))
    missing = [name for name in parameters.get("required") or () if name not in arguments]
    if missing:
        raise ArgumentError("missing required parameter " + ", ".join(f"'{name}'" for name in missing))
    return arguments


def _typed_value(key: str, raw: str, schema: Any) -> Any:
    types = allowed_types(schema)
    if types == {"string"}:
        value = raw
    else:
        decoded = _decode(raw)
        if types is None:
            value = raw if decoded is _MISSING else decoded
        elif decoded is not _MISSING and _matches(decoded, types - {"string"}):
            value = _normalized(decoded, types)
        elif "string" in types:
            value = raw
        else:
            raise ArgumentError(f"parameter '{key}' must be {_describe(types)}, got {preview(raw)}")
    _check_enum(key, value, schema)
    return value


def allowed_types(schema: Any) -> set[str] | None:
    """The JSON types a schema allows, or None when it does not say."""
    if not isinstance(schema, dict):
        return None
    declared = schema.get("type")
    if isinstance(declared, str):
        return {declared}
    if isinstance(declared, list):
        return {t for t in declared if isinstance(t, str)} or None
    alternatives = schema.get("anyOf") or schema.get("oneOf")
    if isinstance(alternatives, list):
        types: set[str] = set()
        for alternative in alternatives:
            alternative_types = allowed_types(alternative)
            if alternative_types is None:
                return None
            types |= alternative_types
        return types
    choices = schema.get("enum") if "enum" in schema else [schema["const"]] if "const" in schema else None
    if isinstance(choices, list) and choices:
        return {_json_type(choice) for choice in choices}
    return None


def _decode(raw: str) -> Any:
    """The value raw text spells as JSON or a Python literal, or _MISSING."""
    text = raw.strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        pass
    try:
        value = ast.literal_eval(text)
        return json.loads(json.dumps(value))  # tuples become lists; sets, bytes, complex are refused
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _MISSING


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _matches(value: Any, types: set[str]) -> bool:
    kind = _json_type(value)
    if kind in types:
        return True
    if kind == "integer":
        return "number" in types
    return kind == "number" and "integer" in types and value.is_integer()


def _normalized(value: Any, types: set[str]) -> Any:
    """5.0 given for an integer-only parameter becomes 5."""
    if isinstance(value, float) and "number" not in types and value.is_integer():
        return int(value)
    return value


def _check_enum(key: str, value: Any, schema: Any) -> None:
    if not isinstance(schema, dict):
        return
    choices = schema["enum"] if "enum" in schema else [schema["const"]] if "const" in schema else None
    if isinstance(choices, list) and not any(_same(value, choice) for choice in choices):
        allowed = ", ".join(json.dumps(choice, ensure_ascii=False) for choice in choices)
        given = json.dumps(value, ensure_ascii=False)[:60]
        raise ArgumentError(f"parameter '{key}' must be one of {allowed}, got {given}")


def _same(a: Any, b: Any) -> bool:
    """JSON equality: 1 equals 1.0, but True is not 1."""
    kinds = {_json_type(a), _json_type(b)}
    return (len(kinds) == 1 or kinds == {"integer", "number"}) and a == b


def _describe(types: set[str]) -> str:
    names = sorted(types)
    return names[0] if len(names) == 1 else "one of " + ", ".join(names)


def preview(text: str, limit: int = 60) -> str:
    """Text quoted for an error message, cut to a readable length."""
    return repr(text if len(text) <= limit else text[:limit] + "...")
