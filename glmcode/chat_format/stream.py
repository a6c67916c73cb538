"""Model output to events, incrementally: reasoning, content and tool calls.

The output of one generation (the prompt already ended with `<think>` or `</think>`) is:

    [reasoning] [</think>] [content] [<tool_call>...</tool_call> [text]]... [stop token]

- Reasoning runs until `</think>`; a `<tool_call>` also ends it. With `thinking=False` the
  output starts as content. Either way a `<think>` at the very start opens reasoning.
- Content runs until a `<tool_call>`. Reasoning and content come out stripped of outer
  whitespace (the template re-renders them stripped); whitespace inside is held back until
  something visible follows it.
- A tool call comes out as one ToolCall or ToolCallError when its `</tool_call>` arrives;
  inside `<arg_value>` only `</arg_value>` counts as a tag. A call left open at the end, or
  interrupted by the next `<tool_call>`, is a ToolCallError. Nothing is ever run by guess.
- Text after a call continues what the call interrupted: reasoning if `</think>` has not come
  yet, else content. Separators there (whitespace, the two characters `\n`, a stray `</think>`)
  are dropped; visible text is kept, after a blank line when the same kind came before, so
  `parse` joins the pieces of content into one text the template renders back before the calls.
- Stop tokens (`<|observation|>`, `<|user|>`, `<|endoftext|>`) are dropped outside tool calls.

`feed` holds back any suffix that may still become a tag, so a tag split across deltas is never
emitted as text. Feeding the output in any pieces gives the same events, once adjacent deltas
of one kind are merged, as `parse` on the whole text.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from glmcode.chat_format import tags
from glmcode.chat_format.arguments import tool_parameters
from glmcode.chat_format.tool_calls import parse_tool_call, skip_separators, unterminated_error
from glmcode.events import ContentDelta, Event, ReasoningDelta, ToolCall, ToolCallError

_REASONING, _CONTENT, _TOOL_CALL = "reasoning", "content", "tool_call"

_SECTION_TAGS = {
    _REASONING: (tags.END_THINK, tags.TOOL_CALL, *tags.STOP_TOKENS),
    _CONTENT: (tags.END_THINK, tags.TOOL_CALL, *tags.STOP_TOKENS),
}
_CALL_TAGS = (tags.ARG_VALUE, tags.END_TOOL_CALL, tags.TOOL_CALL)
_VALUE_TAGS = (tags.END_ARG_VALUE,)
_LONGEST_TAG = max(len(tag) for tag in (*_SECTION_TAGS[_REASONING], *_CALL_TAGS, *_VALUE_TAGS))
_PARAGRAPH = "\n\n"


class StreamParser:
    """Feed raw output text in pieces; get glmcode.events back.

    tools: the OpenAI-style specs the prompt offered (None accepts any function name and types
    values without a schema). thinking: whether the prompt ended with `<think>`.
    """

    def __init__(self, tools: list[dict[str, Any]] | None = None, *, thinking: bool = True) -> None:
        self._schemas = tool_parameters(tools)
        self._state = _REASONING if thinking else _CONTENT
        self._pending = ""  # received, not yet consumed (may end with the start of a tag)
        self._at_output_start = True
        self._section_started = False  # something visible emitted in this reasoning/content
        self._after_call = False  # this section resumed after a tool call
        self._seen = {_REASONING: False, _CONTENT: False}  # visible text of that kind so far
        self._held_space = ""  # whitespace that is only emitted if visible text follows
        self._call: list[str] = []  # raw text of the tool call being read, in pieces
        self._in_value = False
        self._resume_state = self._state  # the section a tool call interrupted

    def feed(self, delta: str) -> list[Event]:
        self._pending += delta
        return self._consume(final=False)

    def finish(self) -> list[Event]:
        """The stream ended: flush what was held back and report a call left open."""
        events = self._consume(final=True)
        if self._state == _TOOL_CALL:
            events.append(unterminated_error("".join(self._call), self._in_value))
        return events

    def _consume(self, final: bool) -> list[Event]:
        events: list[Event] = []
        if self._at_output_start and not self._open_reasoning_at_start(final):
            return events
        while self._pending:
            candidates = self._tags_that_matter()
            position, tag = _first_tag(self._pending, candidates)
            if tag is None:
                keep = 0 if final else _partial_tag_length(self._pending, candidates)
                self._text(self._pending[: len(self._pending) - keep], events)
                self._pending = self._pending[len(self._pending) - keep :]
                break
            self._text(self._pending[:position], events)
            self._pending = self._pending[position + len(tag) :]
            self._tag(tag, events)
        return events

    def _tags_that_matter(self) -> tuple[str, ...]:
        if self._state != _TOOL_CALL:
            return _SECTION_TAGS[self._state]
        return _VALUE_TAGS if self._in_value else _CALL_TAGS

    def _open_reasoning_at_start(self, final: bool) -> bool:
        """Handle a `<think>` that opens the output; False while that is still undecided."""
        rest = self._pending.lstrip()
        if rest.startswith(tags.THINK):
            self._pending = rest[len(tags.THINK) :]
            self._state = self._resume_state = _REASONING
        elif not final and tags.THINK.startswith(rest):
            return False
        self._at_output_start = False
        return True

    def _text(self, text: str, events: list[Event]) -> None:
        if not text:
            return
        if self._state == _TOOL_CALL:
            self._call.append(text)
            return
        text = self._held_space + text
        if not self._section_started:
            text = _lstrip_separators(text) if self._after_call else text.lstrip()
            if self._after_call and text == "\\":  # maybe the start of a literal \n
                self._held_space = text
                return
        visible = text.rstrip()
        self._held_space = text[len(visible) :]
        if visible:
            paragraph = _PARAGRAPH if not self._section_started and self._seen[self._state] else ""
            self._section_started = self._seen[self._state] = True
            delta = ReasoningDelta if self._state == _REASONING else ContentDelta
            events.append(delta(paragraph + visible))

    def _tag(self, tag: str, events: list[Event]) -> None:
        if self._state == _TOOL_CALL:
            self._call_tag(tag, events)
        elif tag == tags.END_THINK:
            if self._state == _REASONING:
                self._start_section(_CONTENT)
            elif self._section_started or not self._after_call:
                self._text(tag, events)  # reasoning already ended: this is just text
        elif tag == tags.TOOL_CALL:
            self._resume_state = self._state
            self._start_call()
        # A stop token outside a call is dropped.

    def _call_tag(self, tag: str, events: list[Event]) -> None:
        if tag == tags.TOOL_CALL:
            events.append(unterminated_error("".join(self._call), self._in_value, interrupted=True))
            self._start_call()
            return
        self._call.append(tag)
        if tag == tags.END_TOOL_CALL:
            events.append(parse_tool_call("".join(self._call), self._schemas))
            self._call = []
            self._start_section(self._resume_state, after_call=True)
        else:
            self._in_value = tag == tags.ARG_VALUE

    def _start_section(self, state: str, after_call: bool = False) -> None:
        self._state = state
        self._section_started = False
        self._after_call = after_call
        self._held_space = ""

    def _start_call(self) -> None:
        self._start_section(_TOOL_CALL)
        self._call = [tags.TOOL_CALL]
        self._in_value = False


def _lstrip_separators(text: str) -> str:
    return text[skip_separators(text, 0) :]


def _first_tag(text: str, candidates: tuple[str, ...]) -> tuple[int, str | None]:
    best_position, best_tag = len(text), None
    for tag in candidates:
        position = text.find(tag, 0, best_position + len(tag))
        if position != -1 and position < best_position:
            best_position, best_tag = position, tag
    return best_position, best_tag


def _partial_tag_length(text: str, candidates: tuple[str, ...]) -> int:
    """Length of the longest suffix of text that is a proper prefix of a candidate tag."""
    position = text.find("<", max(0, len(text) - _LONGEST_TAG + 1))  # every tag starts with "<"
    while position != -1:
        suffix = text[position:]
        if any(tag.startswith(suffix) for tag in candidates):
            return len(suffix)
        position = text.find("<", position + 1)
    return 0


@dataclass
class ParsedMessage:
    """One finished generation. tool_calls: [{"name": str, "arguments": dict}] (well-formed only)."""

    reasoning_content: str = ""
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    errors: list[ToolCallError] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)

    def to_message(self) -> dict[str, Any]:
        """The OpenAI-style assistant message to append to the history and render back."""
        message: dict[str, Any] = {"role": "assistant", "content": self.content}
        if self.reasoning_content:
            message["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            message["tool_calls"] = [{"type": "function", "function": dict(call)} for call in self.tool_calls]
        return message


def parse(text: str, tools: list[dict[str, Any]] | None = None, *, thinking: bool = True) -> ParsedMessage:
    """Parse a complete generation (the text after the prompt's `<think>` or `</think>`)."""
    parser = StreamParser(tools, thinking=thinking)
    events = parser.feed(text) + parser.finish()
    parsed = ParsedMessage(events=events)
    for event in events:
        if isinstance(event, ReasoningDelta):
            parsed.reasoning_content += event.text
        elif isinstance(event, ContentDelta):
            parsed.content += event.text
        elif isinstance(event, ToolCall):
            parsed.tool_calls.append({"name": event.name, "arguments": event.arguments})
        elif isinstance(event, ToolCallError):
            parsed.errors.append(event)
    return parsed
