"""From the SSE body of a streamed chat completion to the shared Events.

Three layers: `SseDecoder` turns lines into `data:` payloads; `StreamAssembler` turns payload
chunks into events: reasoning and content deltas as they come, tool calls only once the
response is complete (a tool call is never emitted from a stream that was cut), then usage
and the finish reason. `_ContentRouter` notices a server that sends the model's raw GLM text
(`...</think>answer<tool_call>name<arg_key>...`) as content and routes it through
`chat_format.StreamParser`.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from typing import Any

from glmcode.events import ContentDelta, Error, Event, Finish, ReasoningDelta, ToolCall, ToolCallError, Usage

DONE = "[DONE]"
RAW_TAGS = ("<tool_call>", "</think>")
_FINISHED_NORMALLY = {"stop": "stop", "tool_calls": "tool_calls", "length": "length",
                      "model_context_window_exceeded": "length"}
_EARLY_STOPS = {
    "sensitive": "the server's content filter stopped the response",
    "network_error": "the server reported a network error in the middle of the response",
}


class SseDecoder:
    """Server-sent events, one line at a time: returns the data of each completed event."""

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed_line(self, line: str) -> str | None:
        if not line:
            return self.flush()
        if line.startswith(":"):  # a comment / keep-alive
            return None
        name, _, value = line.partition(":")
        if name == "data":
            self._data.append(value.removeprefix(" "))
        return None

    def flush(self) -> str | None:
        if not self._data:
            return None
        data, self._data = "\n".join(self._data), []
        return data


def new_call_id() -> str:
    return f"call_{secrets.token_hex(8)}"


class StreamAssembler:
    """The events of one streamed response, built from its decoded chunks.

    detect_raw_tags: watch content for raw GLM tags (self-hosted servers); the hosted API
    always parses the model's output itself.
    """

    def __init__(self, tools: list[dict[str, Any]], *, thinking: bool, detect_raw_tags: bool) -> None:
        self._content = _ContentRouter(tools, thinking=thinking, active=detect_raw_tags)
        self._calls = _ToolCallAssembler()
        self._usage: Usage | None = None
        self.finish_reason: str | None = None

    def feed(self, chunk: dict[str, Any]) -> list[Event]:
        if chunk.get("usage"):
            self._usage = _usage(chunk["usage"])
        events: list[Event] = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            reasoning = delta.get("reasoning_content") or delta.get("reasoning")
            if reasoning:
                events += self._content.structured_seen()
                events.append(ReasoningDelta(reasoning))
            if delta.get("tool_calls"):
                events += self._content.structured_seen()
                self._calls.feed(delta["tool_calls"])
            if delta.get("content"):
                events += self._content.feed(delta["content"])
            if choice.get("finish_reason"):
                self.finish_reason = choice["finish_reason"]
        return events

    def finish(self) -> list[Event]:
        """The stream ended properly: the held text, the tool calls, usage and Finish."""
        events = self._content.finish()
        reason = self.finish_reason or "stop"
        if reason not in _FINISHED_NORMALLY:
            message = _EARLY_STOPS.get(reason, f"the server ended the response early (finish_reason: {reason})")
            return events + self._usage_events() + [Error(message, {"finish_reason": reason}), Finish("error")]
        reason = _FINISHED_NORMALLY[reason]
        calls = self._content.take_tool_calls() + self._calls.complete(truncated=reason == "length")
        return events + calls + self._usage_events() + [Finish("tool_calls" if calls else reason)]

    def abort(self, message: str, kind: str) -> list[Event]:
        """The stream broke off: keep the text received so far, drop every tool call."""
        events = self._content.abort()
        dropped = self._calls.count + self._content.pending_tool_calls
        if dropped:
            message += f"; {dropped} unfinished tool call(s) dropped"
        return events + [Error(message, {"kind": kind, "dropped_tool_calls": dropped}), Finish("error")]

    def _usage_events(self) -> list[Event]:
        return [self._usage] if self._usage else []


def _usage(usage: dict[str, Any]) -> Usage:
    details = usage.get("prompt_tokens_details") or {}
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
        cached_tokens=int(details.get("cached_tokens") or 0),
    )


@dataclass
class _PartialCall:
    id: str = ""
    name: str = ""
    arguments: str = ""


class _ToolCallAssembler:
    """Tool calls by index, from whole calls or from name and argument fragments."""

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    @property
    def count(self) -> int:
        return len(self._calls)

    def feed(self, fragments: list[dict[str, Any]]) -> None:
        for position, fragment in enumerate(fragments):
            call = self._calls.setdefault(fragment.get("index", position), _PartialCall())
            call.id = fragment.get("id") or call.id
            function = fragment.get("function") or {}
            name = function.get("name")
            if name and name != call.name:  # some servers repeat the whole name in each fragment
                call.name += name
            arguments = function.get("arguments")
            if isinstance(arguments, dict):  # the hosted API's schema allows an object
                call.arguments = json.dumps(arguments, ensure_ascii=False)
            elif arguments:
                call.arguments += arguments

    def complete(self, *, truncated: bool) -> list[Event]:
        return [_finished_call(self._calls[index], truncated) for index in sorted(self._calls)]


def _finished_call(call: _PartialCall, truncated: bool) -> Event:
    raw = call.arguments
    if not call.name:
        return ToolCallError(raw=raw, message="the model sent a tool call without a function name")
    try:
        arguments = json.loads(raw) if raw.strip() else {}
        if isinstance(arguments, str):  # arguments encoded twice
            arguments = json.loads(arguments)
    except json.JSONDecodeError as exc:
        cause = " because the response hit max_tokens" if truncated else ""
        message = f"the arguments of {call.name} are not valid JSON{cause} ({exc.msg} at position {exc.pos})"
        return ToolCallError(raw=raw, message=message, name=call.name)
    if not isinstance(arguments, dict):
        message = f"the arguments of {call.name} must be a JSON object, not {type(arguments).__name__}"
        return ToolCallError(raw=raw, message=message, name=call.name)
    return ToolCall(name=call.name, arguments=arguments, raw=raw, id=call.id or new_call_id())


class _ContentRouter:
    """Content deltas as answer text, or as raw GLM text for `chat_format.StreamParser`.

    Modes: "structured" (content is the answer: the hosted API, or a server seen sending
    reasoning or tool_calls fields); "undecided" (with thinking on, content is held back until a
    raw tag or a structured field decides, so raw reasoning is never shown as the answer; with
    thinking off, content flows and only a possible partial `<tool_call>` is held back); "raw"
    (everything goes through StreamParser; its tool calls wait for the end of the stream).
    """

    def __init__(self, tools: list[dict[str, Any]], *, thinking: bool, active: bool) -> None:
        self._tools = tools
        self._thinking = thinking
        self._tags = RAW_TAGS if thinking else ("<tool_call>",)
        self._mode = "undecided" if active else "structured"
        self._held = ""
        self._parser: Any = None
        self._tool_calls: list[Event] = []

    @property
    def pending_tool_calls(self) -> int:
        return len(self._tool_calls)

    def structured_seen(self) -> list[Event]:
        if self._mode != "undecided":
            return []
        self._mode = "structured"
        held, self._held = self._held, ""
        return _content(held)

    def feed(self, text: str) -> list[Event]:
        if self._mode == "structured":
            return _content(text)
        if self._mode == "raw":
            return self._parse(text)
        search_from = max(0, len(self._held) - max(map(len, self._tags)) + 1)
        pending, self._held = self._held + text, ""
        start = _first_tag(pending, self._tags, search_from)
        if start is not None:
            self._start_raw()
            if self._thinking:  # all of it was held back: reasoning first, then the answer
                return self._parse(pending)
            return _content(pending[:start]) + self._parse(pending[start:])
        if self._thinking:
            self._held = pending
            return []
        keep = _partial_tag_length(pending, self._tags)
        self._held = pending[len(pending) - keep :]
        return _content(pending[: len(pending) - keep])

    def finish(self) -> list[Event]:
        if self._mode == "raw":
            return self._sort(self._parser.finish())
        held, self._held = self._held, ""
        return _content(held)

    def take_tool_calls(self) -> list[Event]:
        calls, self._tool_calls = self._tool_calls, []
        return calls

    def abort(self) -> list[Event]:
        """Text only: a tool call from a broken stream is never run."""
        if self._mode != "raw":
            return self.finish()
        return [event for event in self._parser.finish() if isinstance(event, (ReasoningDelta, ContentDelta))]

    def _start_raw(self) -> None:
        from glmcode.chat_format import StreamParser  # only needed for servers without parsers

        self._parser = StreamParser(self._tools, thinking=self._thinking)
        self._mode = "raw"

    def _parse(self, text: str) -> list[Event]:
        return self._sort(self._parser.feed(text))

    def _sort(self, events: list[Event]) -> list[Event]:
        """Pass text through, keep tool calls for the end; Finish and Usage are ours to send."""
        passed: list[Event] = []
        for event in events:
            if isinstance(event, ToolCall):
                self._tool_calls.append(event if event.id else _with_id(event))
            elif isinstance(event, ToolCallError):
                self._tool_calls.append(event)
            elif not isinstance(event, (Finish, Usage)):
                passed.append(event)
        return passed


def _with_id(call: ToolCall) -> ToolCall:
    return ToolCall(name=call.name, arguments=call.arguments, raw=call.raw, id=new_call_id())


def _content(text: str) -> list[Event]:
    return [ContentDelta(text)] if text else []


def _first_tag(text: str, tags: tuple[str, ...], start: int) -> int | None:
    found = [i for i in (text.find(tag, start) for tag in tags) if i >= 0]
    return min(found) if found else None


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest end of `text` that could be the start of a tag."""
    for length in range(min(len(text), max(map(len, tags)) - 1), 0, -1):
        if any(tag.startswith(text[-length:]) for tag in tags):
            return length
    return 0
