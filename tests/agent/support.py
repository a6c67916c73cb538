"""Small real collaborators for the agent's unit tests: a backend that yields scripted Events,
tools over files in a temp dir, an approver and a checkpoint recorder."""

from __future__ import annotations

import copy
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from glmcode.backends.base import Sampling, Thinking
from glmcode.events import ContentDelta, Event, Finish, ReasoningDelta, ToolCall, Usage
from glmcode.tools.base import Tool, ToolResult

# One scripted step: a list of events, an exception to raise, or a function of the cancel event.
Step = list[Event] | Exception | Callable[[threading.Event | None], Iterator[Event]]


@dataclass
class Request:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]
    thinking: Thinking
    sampling: Sampling


class EventBackend:
    """Yields the events of the next scripted step on each stream() call."""

    name = "events"

    def __init__(self, steps: list[Step], *, context_window: int = 100_000, exact_tokens: int | None = None):
        self.steps = list(steps)
        self.context_window = context_window
        self.exact_tokens = exact_tokens
        self.requests: list[Request] = []

    def stream(self, messages, tools, thinking, sampling, cancel=None) -> Iterator[Event]:
        self.requests.append(Request(copy.deepcopy(messages), copy.deepcopy(tools), thinking, sampling))
        step = self.steps[len(self.requests) - 1]
        if isinstance(step, Exception):
            raise step
        if callable(step):
            return step(cancel)
        return iter(step)

    def count_tokens(self, messages, tools) -> int | None:
        return self.exact_tokens

    def close(self) -> None:
        pass


def call(tool: str, **arguments: Any) -> list[Event]:
    """A step that thinks briefly and calls one tool."""
    return [ReasoningDelta(f"I will call {tool}."), ToolCall(tool, arguments), Usage(100, 10), Finish("tool_calls")]


def answer(text: str, reasoning: str = "Done.") -> list[Event]:
    return [ReasoningDelta(reasoning), ContentDelta(text), Usage(120, 5), Finish("stop")]


@dataclass
class Workspace:
    root: Path


@dataclass
class Decision:
    allowed: bool
    reason: str = ""


@dataclass
class Approver:
    """Allows everything except the tool names in `deny`; remembers what it was shown."""

    deny: set[str] = field(default_factory=set)
    seen: list[tuple[str, dict[str, Any], str | None]] = field(default_factory=list)

    def decide(self, tool: Tool, arguments: dict[str, Any], preview: str | None) -> Decision:
        self.seen.append((tool.name, arguments, preview))
        if tool.name in self.deny:
            return Decision(False, f"{tool.name} is not allowed in this test")
        return Decision(True)


@dataclass
class Checkpoints:
    snapshots: list[tuple[str, list[Path] | None]] = field(default_factory=list)
    restored: list[str] = field(default_factory=list)

    def snapshot(self, label: str, paths: list[Path] | None = None) -> str:
        self.snapshots.append((label, paths))
        return f"snap{len(self.snapshots)}"

    def undo(self) -> list[str]:
        return list(self.restored)


def _read_note(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    path = workspace.root / arguments["name"]
    if not path.exists():
        return ToolResult(f"{arguments['name']}: no such note", is_error=True)
    return ToolResult(path.read_text())


def _write_note(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    (workspace.root / arguments["name"]).write_text(arguments["text"])
    return ToolResult(f"wrote {arguments['name']}")


def _explode(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    raise RuntimeError("the tool blew up")


def _interrupt(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    raise KeyboardInterrupt  # what Ctrl-C does to a tool running in the main thread


def _shout(workspace: Workspace, arguments: dict[str, Any]) -> ToolResult:
    return ToolResult("x" * int(arguments["n"]))


def _schema(**properties: str) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {name: {"type": kind} for name, kind in properties.items()},
        "required": list(properties),
    }


def note_tools() -> list[Tool]:
    return [
        Tool("read_note", "Read a note.", _schema(name="string"), "read", _read_note),
        Tool(
            "write_note",
            "Write a note.",
            _schema(name="string", text="string"),
            "edit",
            _write_note,
            preview=lambda ws, args: f"write {args['name']}",
            touched_paths=lambda ws, args: [ws.root / args["name"]],
        ),
        Tool("explode", "Always fails.", _schema(), "command", _explode),
        Tool("interrupt", "Gets Ctrl-C.", _schema(), "command", _interrupt),
        Tool("shout", "Prints n x's.", _schema(n="integer"), "read", _shout),
    ]
