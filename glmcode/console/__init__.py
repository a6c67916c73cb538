"""What the user sees: agent events rendered for a terminal, as plain text, or as JSON.

Three renderers share one interface (`base.Renderer`: `start`, `event`, `pause`, `finish`):
- `terminal.TerminalRenderer`: rich output for a person at a terminal;
- `plain.PlainRenderer`: plain text for pipes and logs (the answer to stdout, the rest to stderr);
- `json_output.JsonRenderer`: `--output-format json` / `stream-json`, whose contract is
  `schema.EVENT_SCHEMA` (checked by `schema.validate_event`).
`approval.ApprovalPrompt` asks the person at the terminal; `report` keeps a run's numbers and its
end; `lines` holds the one-line summaries the text renderers share.

Agent events (ToolStarted, ToolFinished, StepStarted, Compacted) are dispatched by class name,
so this package does not depend on the agent package.
"""

from __future__ import annotations

import sys
from typing import TextIO

from rich.console import Console

from glmcode.console.approval import ApprovalPrompt
from glmcode.console.base import Renderer
from glmcode.console.json_output import JsonRenderer
from glmcode.console.lines import changed_files
from glmcode.console.plain import PlainRenderer
from glmcode.console.report import RunReport, RunStats
from glmcode.console.schema import EVENT_SCHEMA, validate_event
from glmcode.console.terminal import TerminalRenderer
from glmcode.options import JSON_FORMATS

__all__ = [
    "EVENT_SCHEMA", "ApprovalPrompt", "JsonRenderer", "PlainRenderer", "Renderer", "RunReport", "RunStats",
    "TerminalRenderer", "changed_files", "make_renderer", "validate_event",
]


def make_renderer(output_format: str, stats: RunStats, *, show_thinking: bool = False,
                  stdout: TextIO | None = None, stderr: TextIO | None = None) -> Renderer:
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    if output_format in JSON_FORMATS:
        return JsonRenderer(stats, stdout, stream=output_format == "stream-json")
    if stdout.isatty():
        return TerminalRenderer(stats, Console(file=stdout, highlight=False), show_thinking=show_thinking)
    return PlainRenderer(stats, stdout, stderr, show_thinking=show_thinking)
