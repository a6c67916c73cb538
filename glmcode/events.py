"""The events every backend streams, and the agent and console consume.

One small set of frozen dataclasses shared by the local engine, the remote API and the
replay backend. `chat_format.StreamParser` turns raw GLM-format text into these; the remote
backend also builds them from structured SSE deltas.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Union


@dataclass(frozen=True)
class ReasoningDelta:
    """A piece of the model's thinking (text inside <think> ... </think>)."""

    text: str


@dataclass(frozen=True)
class ContentDelta:
    """A piece of the visible answer."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """A complete, well-formed tool call, arguments typed from the tool's JSON schema."""

    name: str
    arguments: dict[str, Any]
    raw: str = ""
    id: str = ""


@dataclass(frozen=True)
class ToolCallError:
    """A tool call that cannot be run as written. `message` is fit to feed back to the model."""

    raw: str
    message: str
    name: str | None = None


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


@dataclass(frozen=True)
class Notice:
    """Something the user should see that is not model output (e.g. a retry after a rate limit)."""

    message: str


@dataclass(frozen=True)
class Finish:
    """The end of one generation. reason: stop | tool_calls | length | cancelled | error."""

    reason: str


@dataclass(frozen=True)
class Error:
    """A failure that ended the stream; partial output already emitted stays valid."""

    message: str
    details: dict[str, Any] = field(default_factory=dict)


Event = Union[ReasoningDelta, ContentDelta, ToolCall, ToolCallError, Usage, Notice, Finish, Error]
