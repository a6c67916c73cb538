"""The protocol the agent uses to talk to any model: local engine, remote API or replay."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Iterator, Protocol

from glmcode.events import Event


@dataclass(frozen=True)
class Sampling:
    """Sampling settings. Defaults are the official ones for agentic coding."""

    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    max_tokens: int = 16384
    seed: int | None = None


@dataclass(frozen=True)
class Thinking:
    """GLM-4.7 thinking modes for one request.

    enabled=False is turn-level thinking off. clear_thinking=False is preserved thinking (all
    past reasoning re-rendered, which keeps the KV prefix stable); True drops reasoning from
    turns before the last user message; None leaves the template variable undefined.
    Interleaved thinking (reasoning of the current turn's steps kept) always holds.
    """

    enabled: bool = True
    clear_thinking: bool | None = False


class Backend(Protocol):
    """A model that turns a conversation into a stream of Events.

    messages: OpenAI-style dicts (role, content, reasoning_content, tool_calls with
    `function.arguments` as a dict, tool_call_id). tools: OpenAI function specs
    (`{"type": "function", "function": {"name", "description", "parameters"}}`).
    A set `cancel` event stops generation at the next token; the stream then ends with
    Finish("cancelled").
    """

    name: str
    context_window: int

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        thinking: Thinking,
        sampling: Sampling,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]: ...

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
        """Exact prompt size in tokens where the backend can tell (local), else None."""
        ...

    def close(self) -> None: ...
