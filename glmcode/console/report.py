"""Run bookkeeping: the numbers behind the status line, and the end of a run as a record."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class RunStats:
    """Numbers for the status line and the result record, updated from the event stream."""

    model: str
    context_window: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    context_used: int = 0
    last_prompt_cached: int = 0
    last_prompt_tokens: int = 0
    tokens_per_second: float | None = None
    _first_token_at: float | None = field(default=None, repr=False)

    def observe(self, event: Any) -> None:
        name = type(event).__name__
        if name in ("ReasoningDelta", "ContentDelta") and self._first_token_at is None:
            self._first_token_at = time.monotonic()
        elif name == "Usage":
            self.prompt_tokens += event.prompt_tokens
            self.completion_tokens += event.completion_tokens
            self.cached_tokens += event.cached_tokens
            self.last_prompt_tokens = event.prompt_tokens
            self.last_prompt_cached = event.cached_tokens
            self.context_used = event.prompt_tokens + event.completion_tokens
            if self._first_token_at is not None and event.completion_tokens > 1:
                elapsed = time.monotonic() - self._first_token_at
                if elapsed > 0:
                    self.tokens_per_second = event.completion_tokens / elapsed
        elif name in ("StepStarted", "Finish"):
            self._first_token_at = None
        elif name == "Compacted":
            self.context_used = event.after_tokens

    def usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "cached_tokens": self.cached_tokens}

    def status_line(self) -> str:
        window = f"/{kilo(self.context_window)}" if self.context_window else ""
        parts = [self.model, f"ctx {kilo(self.context_used)}{window}"]
        if self.tokens_per_second is not None:
            parts.append(f"{self.tokens_per_second:.1f} tok/s")
        if self.cached_tokens:
            share = 100 * self.last_prompt_cached / self.last_prompt_tokens
            parts.append(f"cache {kilo(self.last_prompt_cached)} ({share:.0f}%)")
        return " · ".join(parts)


def kilo(tokens: int | None) -> str:
    if tokens is None:
        return "?"
    return f"{tokens / 1000:.1f}k" if tokens >= 1000 else str(tokens)


@dataclass
class RunReport:
    """The end of a run, as the `result` record and the text summary see it."""

    status: str
    exit_code: int
    result: str
    turns: int
    duration_ms: int
    usage: dict[str, int]
    session_id: str | None = None
    error: str | None = None
    tests: dict[str, Any] | None = None
    diff: str | None = None

    def record(self) -> dict[str, Any]:
        record = {"type": "result", **asdict(self)}
        if self.tests is None:
            del record["tests"]
        if self.diff is None:
            del record["diff"]
        return record
