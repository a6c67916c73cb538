"""What a tool is: a name, a description, a JSON schema and a function."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Literal

if TYPE_CHECKING:
    from glmcode.tools.workspace import Workspace

# read: never changes anything; edit: changes files in the repo; command: runs a process.
ToolKind = Literal["read", "edit", "command"]


@dataclass(frozen=True)
class ToolResult:
    output: str
    is_error: bool = False


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    kind: ToolKind
    run: Callable[["Workspace", dict[str, Any]], ToolResult]
    # What an approval prompt shows: the diff an edit would make, or the command line to run.
    preview: Callable[["Workspace", dict[str, Any]], str | None] = lambda workspace, arguments: None
    # Files an edit will change, to checkpoint first; None means "anything" (a command).
    touched_paths: Callable[["Workspace", dict[str, Any]], list[Path] | None] = lambda workspace, arguments: None
    # For a tool that is not a shell command but runs like one (an MCP tool): the name the
    # allow/deny command rules match. None: the rules see the `command` argument or the preview.
    rule_name: str | None = None

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style function spec the model sees."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }
