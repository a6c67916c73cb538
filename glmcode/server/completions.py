"""Engine outputs to OpenAI chat-completion deltas, chunks and whole responses.

The model's raw GLM text goes through glmcode's own parser (chat_format.StreamParser): thinking
becomes `reasoning_content`, tool calls become `tool_calls` with JSON arguments. A tool call that
cannot be parsed is passed on as its raw text in `content`, so nothing the model wrote is lost.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from glmcode.chat_format import StreamParser
from glmcode.engine.llm import StreamOutput
from glmcode.events import ContentDelta, Event, ReasoningDelta, ToolCall, ToolCallError
from glmcode.server.protocol import StopStrings


@dataclass
class ResponseBuilder:
    """The deltas of one completion, as its outputs arrive; then its finish reason and usage."""

    tools: list[dict[str, Any]] | None
    thinking: bool
    stop_strings: list[str]
    prompt_tokens: int
    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{secrets.token_hex(12)}")
    created: int = field(default_factory=lambda: int(time.time()))
    completion_tokens: int = 0
    cached_tokens: int = 0
    engine_reason: str | None = None
    tool_calls: int = 0

    def __post_init__(self) -> None:
        self._parser = StreamParser(self.tools, thinking=self.thinking)
        self._stops = StopStrings(self.stop_strings)

    @property
    def stopped_by_string(self) -> bool:
        return self._stops.stopped

    def feed(self, output: StreamOutput) -> list[dict[str, Any]]:
        self.completion_tokens += len(output.token_ids)
        self.cached_tokens = output.stats.cached_tokens
        self.engine_reason = output.finish_reason or self.engine_reason
        text = self._stops.feed(output.text)
        return self._deltas(self._parser.feed(text)) if text else []

    def finish(self) -> list[dict[str, Any]]:
        tail = self._stops.finish()
        events = (self._parser.feed(tail) if tail else []) + self._parser.finish()
        return self._deltas(events)

    @property
    def finish_reason(self) -> str:
        if self.tool_calls and self.engine_reason != "length":
            return "tool_calls"
        return "length" if self.engine_reason == "length" and not self.stopped_by_string else "stop"

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }

    def chunk(self, delta: dict[str, Any] | None, finish_reason: str | None = None) -> dict[str, Any]:
        choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}]
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": choices}  # fmt: skip

    def response(self, deltas: list[dict[str, Any]]) -> dict[str, Any]:
        """The whole (non-streamed) completion from all its deltas."""
        message: dict[str, Any] = {"role": "assistant", "content": None}
        reasoning = "".join(d["reasoning_content"] for d in deltas if "reasoning_content" in d)
        content = "".join(d["content"] for d in deltas if "content" in d)
        calls = [call for d in deltas for call in d.get("tool_calls", [])]
        if content or not calls:
            message["content"] = content
        if reasoning:
            message["reasoning_content"] = reasoning
        if calls:
            message["tool_calls"] = [{key: value for key, value in call.items() if key != "index"} for call in calls]
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}],
                "usage": self.usage()}  # fmt: skip

    def _deltas(self, events: list[Event]) -> list[dict[str, Any]]:
        deltas = []
        for event in events:
            if isinstance(event, ReasoningDelta):
                deltas.append({"reasoning_content": event.text})
            elif isinstance(event, ContentDelta):
                deltas.append({"content": event.text})
            elif isinstance(event, ToolCall):
                deltas.append({"tool_calls": [{
                    "index": self.tool_calls, "id": event.id or f"call_{secrets.token_hex(8)}", "type": "function",
                    "function": {"name": event.name, "arguments": json.dumps(event.arguments, ensure_ascii=False)},
                }]})  # fmt: skip
                self.tool_calls += 1
            elif isinstance(event, ToolCallError):
                deltas.append({"content": event.raw})
        return deltas


def sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"
