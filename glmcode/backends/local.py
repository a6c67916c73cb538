"""The embedded engine as a backend: render token ids, stream from the engine, parse the text.

The conversation is rendered with the official template every step. Because the agent keeps
every past message byte-exact (reasoning included, `clear_thinking=False`), each render starts
with the previous one, and the engine's prefix cache serves those tokens from the KV blocks it
kept: a step prefills only what is new (the last reply and the tool results).
"""

from __future__ import annotations

import threading
from typing import Any, Iterator

from glmcode.backends.base import Sampling, Thinking
from glmcode.chat_format import StreamParser, render_ids
from glmcode.engine import LLM, SamplingParams
from glmcode.errors import ContextOverflow
from glmcode.events import Event, Finish, ToolCall, Usage


class LocalBackend:
    name = "local"

    def __init__(self, llm: LLM):
        self.llm = llm
        self.context_window = llm.max_context
        self._thinking = Thinking()  # of the latest request: count_tokens renders the same way

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        thinking: Thinking,
        sampling: Sampling,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        self._thinking = thinking
        prompt = self._render(messages, tools)
        room = self.context_window - len(prompt)
        if room < 1:
            raise ContextOverflow(
                f"the conversation is {len(prompt)} tokens and the context holds {self.context_window}"
            )
        params = SamplingParams(
            max_tokens=min(sampling.max_tokens, room),
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k,
            min_p=sampling.min_p,
            seed=sampling.seed,
        )
        outputs = self.llm.stream(prompt, params)  # a request that cannot fit raises here
        return self._events(outputs, tools, thinking, cancel, len(prompt))

    def _events(self, outputs, tools, thinking: Thinking, cancel, prompt_tokens: int) -> Iterator[Event]:
        parser = StreamParser(tools, thinking=thinking.enabled)
        completion_tokens, reason, called_tools, cached_tokens = 0, "stop", False, 0
        try:
            for output in outputs:
                if cancel is not None and cancel.is_set():
                    reason = "cancelled"
                    break
                completion_tokens += len(output.token_ids)
                cached_tokens = output.stats.cached_tokens
                for event in parser.feed(output.text):
                    called_tools |= isinstance(event, ToolCall)
                    yield event
                reason = output.finish_reason or reason
        finally:
            outputs.close()  # an abandoned stream frees the engine's sequence
        for event in parser.finish():
            called_tools |= isinstance(event, ToolCall)
            yield event
        yield Usage(prompt_tokens, completion_tokens, cached_tokens)
        yield Finish("tool_calls" if called_tools and reason == "stop" else reason)

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
        return len(self._render(messages, tools))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> list[int]:
        return render_ids(
            self.llm.tokenizer,
            messages,
            tools or None,
            enable_thinking=self._thinking.enabled,
            clear_thinking=self._thinking.clear_thinking,
        )

    def close(self) -> None:
        self.llm.close()  # the disk tier writes what it still holds
