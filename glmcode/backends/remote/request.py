"""The chat-completions request body, in the hosted dialect or the vLLM / SGLang one.

The agent's messages are OpenAI-style dicts whose tool-call arguments are dicts; the wire wants
JSON strings, ids on every call and `tool_call_id` on every tool message. Only the fields each
server accepts are sent (the hosted API rejects some OpenAI fields, e.g. `name` on messages).
"""

from __future__ import annotations

import json
from typing import Any

from glmcode.backends.base import Sampling, Thinking

HOSTED_MAX_TOKENS = 131072

_MESSAGE_FIELDS = {
    "system": ("content",),
    "user": ("content",),
    "assistant": ("content", "reasoning_content", "tool_calls"),
    "tool": ("content", "tool_call_id"),
}


def build_request(
    model: str,
    messages: list[dict[str, Any]],
    tools: list[dict[str, Any]],
    thinking: Thinking,
    sampling: Sampling,
    *,
    hosted: bool,
) -> dict[str, Any]:
    body: dict[str, Any] = {"model": model, "messages": wire_messages(messages), "stream": True}
    if tools:
        body["tools"] = [_wire_tool(tool, hosted=hosted) for tool in tools]
        body["tool_choice"] = "auto"
    body.update(_thinking_fields(thinking, hosted=hosted))
    body.update(_sampling_fields(sampling, hosted=hosted))
    if hosted:
        if tools:
            body["tool_stream"] = True
    else:
        # vLLM / SGLang send usage in a final chunk only when asked; the hosted API always does.
        body["stream_options"] = {"include_usage": True}
    return body


def wire_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as the wire wants them; a tool call without an id gets one, and tool results
    without `tool_call_id` are matched to the calls before them in order."""
    wired: list[dict[str, Any]] = []
    unanswered: list[str] = []  # ids of the last assistant message's calls not yet answered
    for position, message in enumerate(messages):
        role = message.get("role")
        if role not in _MESSAGE_FIELDS:
            continue
        out: dict[str, Any] = {"role": role}
        for key in _MESSAGE_FIELDS[role]:
            if message.get(key) is not None:
                out[key] = message[key]
        if role == "assistant":
            out.setdefault("content", "")
            calls = [_wire_tool_call(call, f"call_{position}_{i}") for i, call in enumerate(message.get("tool_calls") or [])]
            if calls:
                out["tool_calls"] = calls
            else:
                out.pop("tool_calls", None)
            unanswered = [call["id"] for call in calls]
        elif role == "tool":
            out["content"] = _text(out.get("content", ""))
            call_id = out.get("tool_call_id") or (unanswered[0] if unanswered else "")
            out["tool_call_id"] = call_id
            if call_id in unanswered:
                unanswered.remove(call_id)
        wired.append(out)
    return wired


def _wire_tool_call(call: dict[str, Any], fallback_id: str) -> dict[str, Any]:
    function = call.get("function", call)
    arguments = function.get("arguments", {})
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments if arguments is not None else {}, ensure_ascii=False)
    return {
        "id": call.get("id") or fallback_id,
        "type": "function",
        "function": {"name": function["name"], "arguments": arguments},
    }


def _wire_tool(tool: dict[str, Any], *, hosted: bool) -> dict[str, Any]:
    if not hosted:
        return tool
    function = {key: value for key, value in tool["function"].items() if key != "strict"}
    return {"type": "function", "function": function}


def _thinking_fields(thinking: Thinking, *, hosted: bool) -> dict[str, Any]:
    if hosted:
        fields: dict[str, Any] = {"type": "enabled" if thinking.enabled else "disabled"}
        if thinking.clear_thinking is not None:
            fields["clear_thinking"] = thinking.clear_thinking
        return {"thinking": fields}
    kwargs: dict[str, Any] = {"enable_thinking": thinking.enabled}
    if thinking.clear_thinking is not None:
        kwargs["clear_thinking"] = thinking.clear_thinking
    return {"chat_template_kwargs": kwargs}


def _sampling_fields(sampling: Sampling, *, hosted: bool) -> dict[str, Any]:
    if hosted:
        fields: dict[str, Any] = {"max_tokens": min(sampling.max_tokens, HOSTED_MAX_TOKENS)}
        if sampling.temperature <= 0:
            fields["do_sample"] = False  # greedy; the hosted API has no temperature 0
        else:
            fields["temperature"] = sampling.temperature
            fields["top_p"] = min(max(sampling.top_p, 0.01), 1.0)
        return fields
    fields = {"max_tokens": sampling.max_tokens, "temperature": sampling.temperature, "top_p": sampling.top_p}
    if sampling.top_k > 0:
        fields["top_k"] = sampling.top_k
    if sampling.min_p > 0:
        fields["min_p"] = sampling.min_p
    if sampling.seed is not None:
        fields["seed"] = sampling.seed
    return fields


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, ensure_ascii=False)
