"""Events the agent adds to the backend's stream, for the console and headless output.

`Agent(on_event=...)` receives every backend Event (glmcode.events) plus these.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from glmcode.events import Event
from glmcode.tools.base import ToolResult


@dataclass(frozen=True)
class StepStarted:
    """The model is asked for its next step (1-based within one run)."""

    step: int


@dataclass(frozen=True)
class ToolStarted:
    call_id: str
    name: str
    arguments: dict[str, Any]


@dataclass(frozen=True)
class ToolFinished:
    """A tool call is settled. denied: refused by the approver (result says why)."""

    call_id: str
    name: str
    result: ToolResult
    denied: bool = False


@dataclass(frozen=True)
class Compacted:
    """The conversation was compacted to fit the context window."""

    before_tokens: int
    after_tokens: int


AgentEvent = Union[StepStarted, ToolStarted, ToolFinished, Compacted]
AnyEvent = Union[Event, AgentEvent]
