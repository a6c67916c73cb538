"""The JSON output contract of `--output-format json` and `stream-json`.

`EVENT_SCHEMA` lists every record type and its keys; `validate_event` checks one record against
it (the tests run every record glmcode prints through it). The README's table mirrors it.
"""

from __future__ import annotations

from typing import Any

NoneType = type(None)

# event type -> {key: allowed python types}. A result may also carry OPTIONAL_RESULT_KEYS.
EVENT_SCHEMA: dict[str, dict[str, tuple[type, ...]]] = {
    "init": {"session_id": (str, NoneType), "model": (str,), "backend": (str,), "repo": (str,),
             "approval": (str,), "sandbox": (str,), "tools": (list,), "version": (str,)},
    "reasoning": {"text": (str,)},
    "message": {"text": (str,)},
    "tool_call": {"id": (str,), "name": (str,), "arguments": (dict,)},
    "tool_result": {"id": (str,), "name": (str,), "output": (str,), "is_error": (bool,),
                    "denied": (bool,)},
    "notice": {"message": (str,)},
    "error": {"message": (str,)},
    "result": {"status": (str,), "exit_code": (int,), "result": (str,), "turns": (int,),
               "duration_ms": (int,), "usage": (dict,), "session_id": (str, NoneType),
               "error": (str, NoneType)},
}
OPTIONAL_RESULT_KEYS: dict[str, tuple[type, ...]] = {"tests": (dict, NoneType), "diff": (str,)}
USAGE_KEYS = ("prompt_tokens", "completion_tokens", "cached_tokens")
RESULT_STATUSES = ("done", "limit", "cancelled", "error", "tests_failed")


def validate_event(record: Any) -> list[str]:
    """Problems with one JSON output record against EVENT_SCHEMA (empty when it conforms)."""
    if not isinstance(record, dict):
        return ["not an object"]
    kind = record.get("type")
    if kind not in EVENT_SCHEMA:
        return [f"unknown type {kind!r}"]
    expected = dict(EVENT_SCHEMA[kind])
    optional = OPTIONAL_RESULT_KEYS if kind == "result" else {}
    problems = []
    for key, types in expected.items():
        if key not in record:
            problems.append(f"{kind}: missing {key!r}")
        elif not isinstance(record[key], types) or (bool in types) != isinstance(record[key], bool):
            problems.append(f"{kind}: {key!r} has type {type(record[key]).__name__}")
    for key, types in optional.items():
        if key in record and not isinstance(record[key], types):
            problems.append(f"{kind}: {key!r} has type {type(record[key]).__name__}")
    extra = set(record) - set(expected) - set(optional) - {"type"}
    if extra:
        problems.append(f"{kind}: unexpected keys {sorted(extra)}")
    if kind == "result":
        if record.get("status") not in RESULT_STATUSES:
            problems.append(f"result: status {record.get('status')!r} not in {RESULT_STATUSES}")
        usage = record.get("usage")
        if isinstance(usage, dict) and not all(isinstance(usage.get(k), int) for k in USAGE_KEYS):
            problems.append(f"result: usage needs integer {', '.join(USAGE_KEYS)}")
    return problems
