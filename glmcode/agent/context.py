"""What the model sees: the system prompt, the token count, and compaction.

The system prompt holds the role and rules, the repo map and the instruction files
(AGENTS.md from the repo root down to the working directory; CLAUDE.md, then CONVENTIONS.md,
where a directory has no AGENTS.md). The tool list is not repeated here: the chat template
renders it from the tool specs.

Compaction, at `threshold` of the backend's context window or on demand: first shorten old
tool outputs; if that is not enough, summarize everything except the system prompt, the
latest user message and the latest step with one model call.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

from glmcode.agent.messages import Message, last_user_index, system_message, truncate_middle, user_message
from glmcode.backends.base import Backend, Sampling, Thinking
from glmcode.errors import GlmcodeError
from glmcode.events import ContentDelta, Error, Event, Usage
from glmcode.tools.base import Tool
from glmcode.tools.registry import run_tool
from glmcode.tools.workspace import Workspace

INSTRUCTION_FILE_NAMES = ("AGENTS.md", "CLAUDE.md", "CONVENTIONS.md")
INSTRUCTIONS_LIMIT = 32_768  # characters, all instruction files together
REPO_MAP_TOKENS = 2_048  # the repo map's budget in the system prompt
CHARS_PER_TOKEN = 3.5  # a conservative estimate for code and English
SHORTENED_TOOL_OUTPUT = 1_000  # characters an old tool output keeps after compaction

ROLE_AND_RULES = """\
You are glmcode, a coding agent working in the user's repository at {root}.
You help with software engineering tasks: reading and explaining code, fixing bugs, \
implementing features, refactoring and running tests. You act through the tools you are given.

Rules:
- Look before you change: find and read the relevant code first. Never guess what a file contains.
- Read a file before editing it. Prefer small, targeted edits with edit_file; keep the \
project's style, naming and conventions; do not reformat unrelated code.
- Paths are relative to the repository root; you cannot reach outside it.
- After changing code, run the tests (run_tests, or the project's own command) and fix the \
failures you caused. Do not weaken or delete tests to make them pass.
- When a tool returns an error, read it and change your approach; do not repeat a call that \
failed the same way.
- Do not run destructive or irreversible commands (git push, git reset --hard, rm -rf, \
publishing) unless the user asked for exactly that.
- Never print or store secrets such as API keys.
- If the request is ambiguous in a way that matters, ask instead of guessing.
- When the task is done, stop calling tools and answer briefly: what you changed, where, and \
how you checked it."""

SUMMARY_INSTRUCTIONS = """\
You compact a coding agent's conversation so it can continue with less context. Write a \
summary that lets the agent carry on without the original messages:
- the user's goals and requests, and any constraints or preferences they stated;
- decisions made and why;
- files read, created or changed, and what is in them now that matters;
- commands and tests run, with their outcome (exact error messages when unresolved);
- what is done, what is left, and the next step.
Be specific (paths, names, numbers). Do not invent anything. Answer with the summary only."""


@dataclass(frozen=True)
class Instructions:
    text: str
    files: list[Path]
    capped: bool


def find_instruction_files(root: Path, cwd: Path | None = None) -> list[Path]:
    """Per directory from the root down to `cwd`: AGENTS.md, else CLAUDE.md, else CONVENTIONS.md."""
    root = root.resolve()
    directories = [root]
    if cwd is not None:
        cwd = cwd.resolve()
        if cwd != root and cwd.is_relative_to(root):
            for part in cwd.relative_to(root).parts:
                directories.append(directories[-1] / part)
    found = []
    for directory in directories:
        for name in INSTRUCTION_FILE_NAMES:
            if (directory / name).is_file():
                found.append(directory / name)
                break
    return found


def load_instructions(root: Path, cwd: Path | None = None, limit: int = INSTRUCTIONS_LIMIT) -> Instructions:
    files = find_instruction_files(root, cwd)
    sections = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        sections.append(f"### {path.relative_to(root.resolve()).as_posix()}\n{text.strip()}")
    text = "\n\n".join(sections)
    if len(text) <= limit:
        return Instructions(text, files, capped=False)
    note = (
        f"\n[Instruction files capped at {limit} characters: {len(text) - limit} characters "
        "were left out. Read the files themselves for the rest.]"
    )
    return Instructions(text[:limit] + note, files, capped=True)


def system_prompt(workspace: Workspace, tools: dict[str, Tool], cwd: Path | None = None) -> tuple[str, Instructions]:
    """The system prompt for `workspace`, with the repo map where the repo_map tool is offered."""
    instructions = load_instructions(workspace.root, cwd)
    repo_map = None
    if "repo_map" in tools:
        result = run_tool(tools["repo_map"], workspace, {"max_tokens": REPO_MAP_TOKENS})
        repo_map = None if result.is_error else result.output
    return build_system_prompt(workspace.root, instructions, repo_map), instructions


def build_system_prompt(root: Path, instructions: Instructions, repo_map: str | None = None) -> str:
    parts = [ROLE_AND_RULES.format(root=root)]
    if repo_map:
        parts.append("## Repository map\n" + repo_map.strip())
    if instructions.text:
        parts.append(
            "## Project instructions\nThe repository's instruction files; follow them.\n\n" + instructions.text
        )
    return "\n\n".join(parts)


def estimate_tokens(messages: list[Message], tools: list[dict[str, Any]] | None = None) -> int:
    chars = len(json.dumps(tools, ensure_ascii=False)) if tools else 0
    for message in messages:
        chars += len(message.get("content") or "") + len(message.get("reasoning_content") or "") + 16
        for call in message.get("tool_calls") or []:
            chars += len(json.dumps(call["function"], ensure_ascii=False))
    return int(chars / CHARS_PER_TOKEN) + 1


class TokenCounter:
    """Prompt size in tokens: exact where the backend can count, else anchored on the last Usage."""

    def __init__(self, backend: Backend):
        self.backend = backend
        self._anchor: tuple[int, list[Message]] | None = None  # (tokens, the messages they cover)

    def observe(self, usage: Usage, messages: list[Message]) -> None:
        """Call after a step's assistant message is appended; its Usage covers all of `messages`."""
        self._anchor = (usage.prompt_tokens + usage.completion_tokens, list(messages))

    def count(self, messages: list[Message], tools: list[dict[str, Any]]) -> int:
        exact = self.backend.count_tokens(messages, tools)
        if exact is not None:
            return exact
        if self._anchor is not None:
            tokens, covered = self._anchor
            if len(messages) >= len(covered) and all(a is b for a, b in zip(messages, covered)):
                return tokens + estimate_tokens(messages[len(covered) :])
        return estimate_tokens(messages, tools)


@dataclass(frozen=True)
class Compaction:
    messages: list[Message]
    before_tokens: int
    after_tokens: int


class Compactor:
    def __init__(self, backend: Backend, counter: TokenCounter, threshold: float = 0.8):
        self.backend = backend
        self.counter = counter
        self.threshold = threshold

    def limit(self) -> int:
        return int(self.backend.context_window * self.threshold)

    def needed(self, messages: list[Message], tools: list[dict[str, Any]]) -> bool:
        return self.counter.count(messages, tools) >= self.limit()

    def compact(
        self,
        messages: list[Message],
        tools: list[dict[str, Any]],
        sampling: Sampling,
        *,
        force: bool = False,
        cancel: threading.Event | None = None,
    ) -> Compaction | None:
        """A shorter conversation, or None when nothing can be cut.

        Raises GlmcodeError when the summary cannot be made.
        """
        before = self.counter.count(messages, tools)
        shortened = shorten_old_tool_outputs(messages)
        after = self.counter.count(shortened, tools)
        head, middle, tail = split_for_summary(shortened)
        if (after < self.limit() and not force) or not middle:
            return Compaction(shortened, before, after) if after < before else None
        summary = self.summarize(middle, sampling, cancel)
        note = (
            "[The conversation was compacted to fit the context window. Summary of the earlier "
            "conversation and of the work done so far on the latest request, which follows verbatim:]\n\n"
        )
        compacted = head + [user_message(note + summary)] + tail
        return Compaction(compacted, before, self.counter.count(compacted, tools))

    def summarize(self, messages: list[Message], sampling: Sampling, cancel: threading.Event | None) -> str:
        budget = int(self.backend.context_window * 0.5 * CHARS_PER_TOKEN)
        prompt = [
            system_message(SUMMARY_INSTRUCTIONS),
            user_message("Conversation to summarize:\n\n" + truncate_middle(transcript(messages), budget)),
        ]
        summary_sampling = replace(sampling, max_tokens=min(sampling.max_tokens, 4096))
        pieces = []
        for event in self._summary_stream(prompt, summary_sampling, cancel):
            if isinstance(event, ContentDelta):
                pieces.append(event.text)
            elif isinstance(event, Error):
                raise GlmcodeError(f"compaction failed: the model could not summarize ({event.message})")
        summary = "".join(pieces).strip()
        if cancel is not None and cancel.is_set():
            raise GlmcodeError("compaction cancelled: the conversation was left as it was")
        if not summary:
            raise GlmcodeError("compaction failed: the model returned an empty summary")
        return summary

    def _summary_stream(self, prompt: list[Message], sampling: Sampling,
                        cancel: threading.Event | None) -> Iterator[Event]:
        try:
            yield from self.backend.stream(prompt, [], Thinking(enabled=False), sampling, cancel)
        except GlmcodeError as exc:
            raise GlmcodeError(f"compaction failed: {exc}") from exc


def shorten_old_tool_outputs(messages: list[Message], limit: int = SHORTENED_TOOL_OUTPUT) -> list[Message]:
    """A copy where tool results older than the latest step keep only their head and tail."""
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return [
        {**m, "content": truncate_middle(m["content"], limit)}
        if m["role"] == "tool" and i < last_assistant and isinstance(m.get("content"), str)
        else m
        for i, m in enumerate(messages)
    ]


def split_for_summary(messages: list[Message]) -> tuple[list[Message], list[Message], list[Message]]:
    """(kept head, to summarize, kept tail).

    Kept verbatim: the system prompt (with the instruction files), the latest user message, and
    the latest assistant step after it with its tool results (so no call loses its result).
    """
    head = messages[:1] if messages and messages[0]["role"] == "system" else []
    user_index = last_user_index(messages)
    if user_index is None:
        return head, [], messages[len(head) :]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=-1)
    step_start = last_assistant if last_assistant > user_index else len(messages)
    middle = messages[len(head) : user_index] + messages[user_index + 1 : step_start]
    tail = [messages[user_index]] + messages[step_start:]
    return head, middle, tail


def transcript(messages: list[Message], tool_output_limit: int = 2_000) -> str:
    """Plain text of a conversation for the summarizer (reasoning left out)."""
    lines = []
    for message in messages:
        role = message["role"]
        content = message.get("content") or ""
        if role == "tool":
            lines.append(f"[tool result: {message.get('name', '')}]\n{truncate_middle(content, tool_output_limit)}")
            continue
        lines.append(f"[{role}]\n{content}" if content else f"[{role}]")
        for call in message.get("tool_calls") or []:
            function = call["function"]
            arguments = json.dumps(function["arguments"], ensure_ascii=False)
            lines.append(f"(called {function['name']} {truncate_middle(arguments, tool_output_limit)})")
    return "\n\n".join(lines)
