"""A backend that plays scripted model output, for tests and demos.

Each `stream()` call takes the next scripted completion: raw GLM-4.7 text as the model would
write it after the generation prompt (so with thinking on it starts inside the reasoning:
"Let me look.</think><tool_call>read_file<arg_key>path</arg_key>..."). The text goes through
the real `chat_format.StreamParser` in small chunks, so the agent sees exactly what a local
model's output would produce. Every request is recorded for assertions.
"""

from __future__ import annotations

import copy
import math
import threading
from dataclasses import dataclass
from typing import Any, Iterator

from glmcode.backends.base import Sampling, Thinking
from glmcode.chat_format import StreamParser, render
from glmcode.errors import GlmcodeError
from glmcode.events import Event, Finish, ToolCall, Usage


class ScriptExhausted(GlmcodeError):
    """The agent asked for more completions than the script holds."""


@dataclass(frozen=True)
class ReplayRequest:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    thinking: Thinking
    sampling: Sampling


class ReplayBackend:
    name = "replay"

    def __init__(self, script: list[str], *, chunk_size: int = 5, context_window: int = 131_072):
        self.script = list(script)
        self.chunk_size = chunk_size
        self.context_window = context_window
        self.requests: list[ReplayRequest] = []

    @property
    def remaining(self) -> int:
        return len(self.script) - len(self.requests)

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        thinking: Thinking,
        sampling: Sampling,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        if self.remaining <= 0:
            raise ScriptExhausted(
                f"replay script exhausted: the agent asked for completion {len(self.requests) + 1} "
                f"but the script holds {len(self.script)}"
            )
        text = self.script[len(self.requests)]
        self.requests.append(ReplayRequest(copy.deepcopy(messages), copy.deepcopy(tools), thinking, sampling))
        return self._play(text, messages, tools, thinking, cancel)

    def _play(
        self,
        text: str,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        thinking: Thinking,
        cancel: threading.Event | None,
    ) -> Iterator[Event]:
        parser = StreamParser(tools, thinking=thinking.enabled)
        called_tools = False
        for start in range(0, len(text), self.chunk_size):
            if cancel is not None and cancel.is_set():
                yield Finish("cancelled")
                return
            for event in parser.feed(text[start : start + self.chunk_size]):
                called_tools |= isinstance(event, ToolCall)
                yield event
        for event in parser.finish():
            called_tools |= isinstance(event, ToolCall)
            yield event
        prompt = render(
            messages, tools or None, enable_thinking=thinking.enabled, clear_thinking=thinking.clear_thinking
        )
        yield Usage(prompt_tokens=_estimate_tokens(prompt), completion_tokens=_estimate_tokens(text))
        yield Finish("tool_calls" if called_tools else "stop")

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
        return None

    def close(self) -> None:
        pass


def _estimate_tokens(text: str) -> int:
    return max(1, math.ceil(len(text) / 4))
