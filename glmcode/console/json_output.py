"""`JsonRenderer`: `--output-format stream-json` (one record per line as things happen) and
`json` (only the result record at the end); the records follow `schema.EVENT_SCHEMA`."""

from __future__ import annotations

import json
from typing import Any, TextIO

from glmcode.console.base import Renderer
from glmcode.console.report import RunReport, RunStats


class JsonRenderer(Renderer):
    """`stream-json`: each event as one JSON line; `json`: only the result object at the end."""

    def __init__(self, stats: RunStats, out: TextIO, *, stream: bool) -> None:
        super().__init__(stats)
        self.out = out
        self.stream = stream
        self._block: str | None = None
        self._text = ""
        self._announced_calls: set[str] = set()

    def _emit(self, record: dict[str, Any]) -> None:
        if self.stream:
            self.out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self.out.flush()

    def _close_block(self) -> None:
        if self._block and self._text:
            self._emit({"type": "reasoning" if self._block == "reasoning" else "message", "text": self._text})
        self._block, self._text = None, ""

    def _add(self, kind: str, text: str) -> None:
        if self._block != kind:
            self._close_block()
            self._block = kind
        self._text += text

    def start(self, info: dict[str, Any]) -> None:
        self._emit({"type": "init", **info})

    def on_ReasoningDelta(self, event: Any) -> None:
        self._add("reasoning", event.text)

    def on_ContentDelta(self, event: Any) -> None:
        self._add("content", event.text)

    def _announce(self, call_id: str, name: str, arguments: dict[str, Any]) -> None:
        if call_id not in self._announced_calls:
            self._announced_calls.add(call_id)
            self._emit({"type": "tool_call", "id": call_id, "name": name, "arguments": arguments})

    def on_ToolStarted(self, event: Any) -> None:
        self._close_block()
        self._announce(event.call_id, event.name, event.arguments)

    def on_ToolFinished(self, event: Any) -> None:
        self._close_block()
        self._announce(event.call_id, event.name, {})  # a no-op after ToolStarted, which carries the arguments
        self._emit({"type": "tool_result", "id": event.call_id, "name": event.name, "output": event.result.output,
                    "is_error": event.result.is_error, "denied": event.denied})

    def on_ToolCallError(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "error", "message": f"malformed tool call: {event.message}"})

    def on_Notice(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "notice", "message": event.message})

    def on_Error(self, event: Any) -> None:
        self._close_block()
        self._emit({"type": "error", "message": event.message})

    def on_Compacted(self, event: Any) -> None:
        self._close_block()
        message = f"context compacted: {event.before_tokens} -> {event.after_tokens} tokens"
        self._emit({"type": "notice", "message": message})

    def on_Finish(self, event: Any) -> None:
        self._close_block()

    def pause(self) -> None:
        self._close_block()

    def finish(self, report: RunReport) -> None:
        self._close_block()
        self.out.write(json.dumps(report.record(), ensure_ascii=False, default=str) + "\n")
        self.out.flush()
