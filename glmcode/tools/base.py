"""What a tool is: a name, a description, a JSON schema and a function."""

from __future__ import annotations

from dataclasses import dataclass
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

    def spec(self) -> dict[str, Any]:
        """The OpenAI-style function spec the model sees."""
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }
