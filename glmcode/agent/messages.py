"""The conversation: OpenAI-style message dicts, and the assistant step being streamed.

Messages stay plain dicts because that is what every backend, the chat template and the
session file take. Assistant messages keep `reasoning_content` apart from `content`, both
byte-exact as streamed (the template strips; we never do), and tool-call `arguments` as the
dict the parser typed, so the next render reproduces what the model wrote.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from glmcode.events import ContentDelta, Error, Event, Finish, ReasoningDelta, ToolCall, ToolCallError, Usage

Message = dict[str, Any]


def system_message(text: str) -> Message:
    return {"role": "system", "content": text}


def user_message(text: str) -> Message:
    return {"role": "user", "content": text}


def tool_message(call_id: str, name: str, content: str) -> Message:
    return {"role": "tool", "tool_call_id": call_id, "name": name, "content": content}


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:16]}"


@dataclass
class PendingCall:
    """A tool call the model made. `error` is set when it cannot be run as written."""

    id: str
    name: str
    arguments: dict[str, Any]
    error: str | None = None

    def as_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class AssistantStep:
    """Collects one streamed generation into an assistant message."""

    content: list[str] = field(default_factory=list)
    reasoning: list[str] = field(default_factory=list)
    calls: list[PendingCall] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None
    error: str | None = None

    def add(self, event: Event) -> None:
        if isinstance(event, ReasoningDelta):
            self.reasoning.append(event.text)
        elif isinstance(event, ContentDelta):
            self.content.append(event.text)
        elif isinstance(event, ToolCall):
            self.calls.append(PendingCall(event.id or new_call_id(), event.name, dict(event.arguments)))
        elif isinstance(event, ToolCallError):
            name = event.name or "invalid_tool_call"
            self.calls.append(PendingCall(new_call_id(), name, {}, error=event.message))
        elif isinstance(event, Usage):
            self.usage = event
        elif isinstance(event, Finish):
            self.finish_reason = event.reason
        elif isinstance(event, Error):
            self.error = event.message

    @property
    def text(self) -> str:
        return "".join(self.content)

    @property
    def is_empty(self) -> bool:
        return not (self.content or self.reasoning or self.calls)

    def to_message(self) -> Message:
        message: Message = {"role": "assistant", "content": self.text}
        reasoning = "".join(self.reasoning)
        if reasoning:
            message["reasoning_content"] = reasoning
        if self.calls:
            message["tool_calls"] = [call.as_openai() for call in self.calls]
        return message


def add_usage(total: Usage, usage: Usage) -> Usage:
    return Usage(
        total.prompt_tokens + usage.prompt_tokens,
        total.completion_tokens + usage.completion_tokens,
        total.cached_tokens + usage.cached_tokens,
    )


def unanswered_calls(messages: list[Message]) -> list[tuple[str, str]]:
    """(id, name) of the last assistant message's tool calls that have no tool result yet."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "assistant":
            answered = {m.get("tool_call_id") for m in messages[index + 1 :] if m["role"] == "tool"}
            calls = messages[index].get("tool_calls") or []
            return [(c["id"], c["function"]["name"]) for c in calls if c["id"] not in answered]
    return []


def call_key(name: str, arguments: dict[str, Any]) -> str:
    """Identity of a call for the loop guard: the name plus canonical arguments."""
    return name + json.dumps(arguments, sort_keys=True, ensure_ascii=False, default=str)


def truncate_middle(text: str, limit: int) -> str:
    """Keep the head and tail of `text` within about `limit` characters, with a visible note."""
    if len(text) <= limit:
        return text
    head = text[: limit // 2]
    tail = text[len(text) - limit // 2 :]
    omitted = len(text) - len(head) - len(tail)
    return f"{head}\n[... {omitted} characters omitted: output truncated to {limit} characters ...]\n{tail}"


def last_user_index(messages: list[Message]) -> int | None:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index]["role"] == "user":
            return index
    return None
