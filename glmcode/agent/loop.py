"""The agent loop: ask the model for a step, run the tools it calls, repeat until it answers.

    run(user_input):
        append the user message
        loop: check limits -> compact if needed -> stream one step -> no tool calls? done
              else for each call: approve -> checkpoint -> run -> append the (truncated) result

Every exit leaves the conversation consistent: a partial step is kept as an assistant message,
and each tool call gets a result (a "not run" one when the run stopped before it). Early exits
travel as `_Stop(status, reason)`; the reason reaches the caller in `RunResult.error`, once.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Literal

from glmcode.agent.approval import Approver
from glmcode.agent.context import Compactor, TokenCounter, system_prompt
from glmcode.agent.events import AnyEvent, Compacted, StepStarted, ToolFinished, ToolStarted
from glmcode.agent.messages import AssistantStep, Message, PendingCall, add_usage, call_key, truncate_middle
from glmcode.agent.messages import system_message, tool_message, unanswered_calls, user_message
from glmcode.agent.session import SessionLog, known_secrets, mask_secrets
from glmcode.agent.undo import Checkpoints
from glmcode.backends.base import Backend, Sampling, Thinking
from glmcode.errors import ContextOverflow, GlmcodeError
from glmcode.events import Error, Finish, Notice, Usage
from glmcode.tools.base import Tool, ToolResult
from glmcode.tools.registry import all_tools, run_tool
from glmcode.tools.workspace import Workspace

Status = Literal["done", "limit", "cancelled", "error"]
CANCELLED = "cancelled by the user"


@dataclass
class AgentConfig:
    max_turns: int = 50  # model steps per run
    max_tokens: int | None = None  # prompt + completion tokens per run, summed over steps
    wall_time: float | None = None  # seconds per run
    thinking: Thinking = field(default_factory=Thinking)
    sampling: Sampling = field(default_factory=Sampling)
    repeat_warn: int = 3  # the same call this many times in a row gets a warning
    repeat_stop: int = 5  # ... and this many times stops the run
    tool_output_limit: int = 20_000  # characters of one tool result the model sees
    compact_threshold: float = 0.8  # of the backend's context window
    cwd: Path | None = None  # where instruction files are looked up to (default: the repo root)
    # Exact values masked in tool output before anyone sees it (the model, the user, the session):
    # a command that prints the environment or a .env file must not spread the API key.
    secrets: tuple[str, ...] = field(default_factory=lambda: tuple(known_secrets()))


@dataclass
class RunResult:
    status: Status
    turns: int
    usage: Usage
    final_text: str = ""
    error: str | None = None
    exception: GlmcodeError | None = None  # what the backend raised, for the exit code



class _CannotCompact(Exception):
    """Why the conversation cannot be compacted (one line)."""


class _Stop(Exception):
    def __init__(self, status: Status, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@dataclass
class _Run:
    cancel: threading.Event
    started: float
    turns: int = 0
    usage: Usage = Usage(0, 0)
    last_call: str = ""
    repeats: int = 0
    exception: GlmcodeError | None = None


class Agent:
    def __init__(
        self,
        backend: Backend,
        workspace: Workspace,
        approver: Approver,
        config: AgentConfig | None = None,
        *,
        session: SessionLog | None = None,
        tools: list[Tool] | None = None,
        checkpoints: Checkpoints | None = None,
        on_event: Callable[[AnyEvent], None] | None = None,
    ):
        tools = all_tools() if tools is None else tools
        self.backend, self.workspace, self.approver = backend, workspace, approver
        self.config = config or AgentConfig()
        self.session = session
        self.checkpoints = checkpoints or Checkpoints(workspace)
        self.tools = {tool.name: tool for tool in tools}
        self.tool_specs = [tool.spec() for tool in tools]
        self.on_event = on_event or (lambda event: None)
        self.counter = TokenCounter(backend)
        self.compactor = Compactor(backend, self.counter, self.config.compact_threshold)
        self.messages: list[Message] = session.messages() if session else []
        self._note_for_next_turn = ""
        self._run = _Run(threading.Event(), time.monotonic())
        if not self.messages:
            self._append(system_message(self._system_prompt()))
        self._answer_unanswered("the session ended before it ran")  # a resumed session that crashed

    # -- commands ------------------------------------------------------------------------------

    def run(self, user_input: str, cancel: threading.Event | None = None) -> RunResult:
        self._run = _Run(cancel or threading.Event(), time.monotonic())
        self._append(user_message(self._note_for_next_turn + user_input))
        self._note_for_next_turn = ""
        try:
            while True:
                self._check_limits()
                step = self._step()
                if not step.calls:
                    return self._result("done", final_text=step.text)
                for call in step.calls:
                    self._check_limits(between_tools=True)
                    self._run_call(call)
        except _Stop as stop:
            return self._stopped(stop.status, stop.reason)
        except KeyboardInterrupt:
            return self._stopped("cancelled", CANCELLED)

    def compact(self, *, force: bool = True, cancel: threading.Event | None = None) -> Compacted | None:
        """Shrink the conversation (on demand: /compact). None when it could not be done (a Notice says why)."""
        try:
            return self._compact(force, cancel)
        except _CannotCompact as reason:
            self.on_event(Notice(str(reason)))
            return None

    def _compact(self, force: bool, cancel: threading.Event | None) -> Compacted | None:
        """Compact now; None when not needed (not forced); _CannotCompact when it cannot be done."""
        try:
            compaction = self.compactor.compact(
                self.messages, self.tool_specs, self.config.sampling, force=force, cancel=cancel
            )
        except GlmcodeError as exc:
            raise _CannotCompact(str(exc)) from exc
        if compaction is None:
            if force:
                raise _CannotCompact("nothing to compact: the conversation is as short as it can be made")
            return None
        self._replace_messages(compaction.messages, reason="compaction")
        event = Compacted(compaction.before_tokens, compaction.after_tokens)
        self.on_event(event)
        return event

    def clear(self) -> None:
        """Start the conversation afresh (system prompt rebuilt)."""
        self._replace_messages([system_message(self._system_prompt())], reason="clear")

    def undo(self) -> list[str]:
        """Restore the files as they were before the last change; the model is told next turn."""
        changed = self.checkpoints.undo()
        if changed:
            self._note_for_next_turn += (
                f"[The user undid your last change; these files were restored: {', '.join(changed)}. "
                "Read them again before editing.]\n\n"
            )
        return changed

    def set_thinking(self, enabled: bool) -> None:
        self.config.thinking = replace(self.config.thinking, enabled=enabled)

    def context_tokens(self) -> int:
        return self.counter.count(self.messages, self.tool_specs)

    # -- one step ------------------------------------------------------------------------------

    def _step(self) -> AssistantStep:
        self._run.turns += 1
        self.on_event(StepStarted(self._run.turns))
        if self.compactor.needed(self.messages, self.tool_specs):
            self.compact(force=False, cancel=self._run.cancel)
        step = AssistantStep()
        try:
            self._stream(step)
        except KeyboardInterrupt:
            step.finish_reason = "cancelled"
        if step.finish_reason == "cancelled" or self._run.cancel.is_set():
            step.finish_reason = "cancelled"
            self.on_event(Finish("cancelled"))
        if not step.is_empty:
            self._append(step.to_message())
        if step.usage:
            self._run.usage = add_usage(self._run.usage, step.usage)
            self.counter.observe(step.usage, self.messages)
        if step.finish_reason == "cancelled":
            raise _Stop("cancelled", CANCELLED)
        if step.error:
            raise _Stop("error", step.error)
        self._check_limits(between_tools=True)
        return step

    def _stream(self, step: AssistantStep) -> None:
        """Stream one generation into `step`; one compaction and retry on ContextOverflow."""
        for attempt in (1, 2):
            try:
                events = self.backend.stream(
                    self.messages, self.tool_specs, self.config.thinking, self.config.sampling, self._run.cancel
                )
                try:
                    for event in events:
                        if self._run.cancel.is_set() or self._out_of_time():
                            break
                        step.add(event)
                        if not isinstance(event, Error):  # an Error ends the run; its result says it, once
                            self.on_event(event)
                finally:
                    getattr(events, "close", lambda: None)()
                return
            except ContextOverflow as exc:
                if attempt == 1 and step.is_empty:
                    try:
                        self._compact(force=True, cancel=self._run.cancel)
                        continue
                    except _CannotCompact as reason:  # one line: the overflow and why compacting cannot help
                        message = f"{exc}; {reason}"
                else:
                    message = f"{exc}, even after compacting the conversation" if attempt == 2 else str(exc)
                step.error, self._run.exception = message, exc
                return
            except GlmcodeError as exc:
                step.error, self._run.exception = str(exc), exc
                return

    # -- tool calls ----------------------------------------------------------------------------

    def _run_call(self, call: PendingCall) -> None:
        self.on_event(ToolStarted(call.id, call.name, call.arguments))
        repeats = self._count_repeat(call)
        stop: _Stop | None = None
        if repeats >= self.config.repeat_stop:
            note = f"this exact call was made {repeats} times in a row; the run stops here"
            result, denied = ToolResult(f"Error: not run: {note}.", is_error=True), False
            stop = _Stop("limit", f"loop guard: {call.name} called {repeats} times in a row with the same arguments")
        else:
            try:
                result, denied = self._execute(call)
            except KeyboardInterrupt:
                note = f"interrupted while running ({CANCELLED}); it may have had partial effects"
                result, denied = ToolResult(f"Error: {note}.", is_error=True), False
                stop = _Stop("cancelled", CANCELLED)
        output = truncate_middle(mask_secrets(result.output, self.config.secrets), self.config.tool_output_limit)
        if self.config.repeat_warn <= repeats < self.config.repeat_stop:
            output += (
                f"\n\n[Warning: you have made this exact call {repeats} times in a row. It will not give a "
                f"different result; change your approach. At {self.config.repeat_stop} the run stops.]"
            )
        result = ToolResult(output, result.is_error)
        self._append(tool_message(call.id, call.name, result.output))
        self.on_event(ToolFinished(call.id, call.name, result, denied))
        if stop:
            raise stop

    def _execute(self, call: PendingCall) -> tuple[ToolResult, bool]:
        """(result, denied) for one call: approval, checkpoint, run."""
        if call.error:
            return ToolResult(f"Error: {call.error}", is_error=True), False
        tool = self.tools.get(call.name)
        if tool is None:
            known = ", ".join(sorted(self.tools))
            return ToolResult(f"Error: there is no tool named '{call.name}'. Available tools: {known}.", True), False
        try:
            preview = tool.preview(self.workspace, call.arguments)
        except Exception as exc:  # the tool itself would fail the same way; tell the model
            return ToolResult(f"Error: {exc}", is_error=True), False
        decision = self.approver.decide(tool, call.arguments, preview)
        if not decision.allowed:
            return ToolResult(f"Denied: {decision.reason}", is_error=True), True
        if tool.kind != "read":
            self._checkpoint(tool, call)
        return run_tool(tool, self.workspace, call.arguments), False

    def _checkpoint(self, tool: Tool, call: PendingCall) -> None:
        try:
            paths = tool.touched_paths(self.workspace, call.arguments)
            self.checkpoints.snapshot(f"before {tool.name} ({call.id})", paths)
        except Exception as exc:
            self.on_event(Notice(f"could not checkpoint before {tool.name} ({exc}); /undo will not cover it"))

    def _count_repeat(self, call: PendingCall) -> int:
        key = call_key(call.name, call.arguments)
        self._run.repeats = self._run.repeats + 1 if key == self._run.last_call else 1
        self._run.last_call = key
        return self._run.repeats

    # -- limits, results, bookkeeping ----------------------------------------------------------

    def _check_limits(self, *, between_tools: bool = False) -> None:
        run, config = self._run, self.config
        if run.cancel.is_set():
            raise _Stop("cancelled", CANCELLED)
        if self._out_of_time():
            raise _Stop("limit", f"wall time limit reached ({config.wall_time:g}s)")
        spent = run.usage.prompt_tokens + run.usage.completion_tokens
        if config.max_tokens is not None and spent >= config.max_tokens:
            raise _Stop("limit", f"token limit reached ({spent} of {config.max_tokens})")
        if not between_tools and run.turns >= config.max_turns:
            raise _Stop("limit", f"turn limit reached ({config.max_turns} steps)")

    def _out_of_time(self) -> bool:
        wall_time = self.config.wall_time
        return wall_time is not None and time.monotonic() - self._run.started >= wall_time

    def _stopped(self, status: Status, reason: str) -> RunResult:
        """End a run early, leaving no tool call without a result.

        The reason travels in the result only (no Notice): whoever shows the result says it once.
        """
        self._answer_unanswered(reason)
        return self._result(status, error=reason)

    def _answer_unanswered(self, reason: str) -> None:
        for call_id, name in unanswered_calls(self.messages):
            self._append(tool_message(call_id, name, f"Error: not run: {reason}."))

    def _result(self, status: Status, final_text: str = "", error: str | None = None) -> RunResult:
        return RunResult(status, self._run.turns, self._run.usage, final_text, error, self._run.exception)

    def _append(self, message: Message) -> None:
        self.messages.append(message)
        if self.session:
            self.session.append({"type": "message", "message": message})

    def _replace_messages(self, messages: list[Message], reason: str) -> None:
        self.messages = messages
        if self.session:
            self.session.append({"type": "replace", "reason": reason, "messages": messages})

    def _system_prompt(self) -> str:
        prompt, instructions = system_prompt(self.workspace, self.tools, self.config.cwd)
        if instructions.capped:
            self.on_event(Notice("the instruction files are longer than the cap; the rest was left out"))
        return prompt
