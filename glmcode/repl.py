"""`glmcode chat`: the prompt-toolkit input loop and its slash commands.

Input: Enter sends. Esc then Enter (or Alt+Enter) inserts a new line, and so does a line that
ends with a backslash. `@path` attaches a file from the repository; Tab completes paths after
`@` and slash commands. Ctrl-C stops the current answer (a second Ctrl-C leaves, also one that
comes just after the stop, at the prompt); at an empty prompt Ctrl-C twice, Ctrl-D or /exit leaves.

Besides the built-in slash commands, `/NAME args` runs a custom command (glmcode.custom_commands),
read afresh each time so a new or edited file works at once. The session's MCP servers start
before the first prompt and stop when the REPL ends.
"""

from __future__ import annotations

import re
import signal
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prompt_toolkit import PromptSession
from prompt_toolkit import prompt as ask_line
from prompt_toolkit.completion import Completer, Completion, PathCompleter, WordCompleter
from prompt_toolkit.document import Document
from prompt_toolkit.formatted_text import HTML
from prompt_toolkit.history import FileHistory
from prompt_toolkit.key_binding import KeyBindings
from rich.console import Console
from rich.text import Text

from glmcode.console import ApprovalPrompt, RunStats, TerminalRenderer
from glmcode.custom_commands import CommandSet, load_commands
from glmcode.errors import Interrupted
from glmcode.launch import (
    AgentParts, backend_label, build_agent, command_sandbox, model_label, open_backend, open_session,
    sandbox_for_mode, start_mcp_servers,
)
from glmcode.mcp.client import McpServers
from glmcode.options import APPROVAL_MODES, ApprovalMode
from glmcode.run import ctrl_c_cancels, describe_failure
from glmcode.sandbox import Sandbox
from glmcode.settings import Settings, data_home

SLASH_COMMANDS = {
    "/help": "this list",
    "/think": "on|off: thinking before answers; show|hide: full or one-line display; alone: expand the last thinking",
    "/mode": f"{'|'.join(APPROVAL_MODES)}: what needs your approval",
    "/diff": "changes made in this session",
    "/undo": "revert the last change the agent made",
    "/clear": "start the conversation afresh (files stay as they are)",
    "/compact": "summarize the conversation to free context",
    "/model": "the model and backend in use",
    "/tokens": "context and token usage",
    "/sessions": "saved sessions for this repository",
    "/mcp": "the MCP servers of this session and their tools",
    "/exit": "leave (also Ctrl-D)",
}
BUILTIN_NAMES = (*SLASH_COMMANDS, "/quit")  # names a custom command may not take
_SLASH_ARGUMENTS = {"/think": ["on", "off", "show", "hide"], "/mode": list(APPROVAL_MODES)}
_ATTACHMENT = re.compile(r"(?<!\S)@(\S+)")
MAX_ATTACHMENT_BYTES = 256_000
# A Ctrl-C at the prompt this soon after one stopped an answer is that press's second: it leaves
# (exit 130) as it would have while the answer was stopping.
SECOND_PRESS_S = 3.0


# --- input helpers -------------------------------------------------------------------------------

def expand_attachments(text: str, repo: Path) -> tuple[str, list[str]]:
    """Append the files named as `@path` (inside the repo) to the message; returns (message, attached)."""
    attached: list[str] = []
    blocks: list[str] = []
    root = repo.resolve()
    for name in dict.fromkeys(_ATTACHMENT.findall(text)):
        path = (root / name).resolve()
        if not path.is_file() or not path.is_relative_to(root):
            continue
        content = path.read_bytes()[:MAX_ATTACHMENT_BYTES].decode("utf-8", errors="replace")
        blocks.append(f"Attached file {name}:\n```\n{content.rstrip()}\n```")
        attached.append(name)
    return ("\n\n".join([text, *blocks]) if blocks else text), attached


class ReplCompleter(Completer):
    """Slash commands and their arguments; repository paths after `@`."""

    def __init__(self, repo: Path) -> None:
        self.paths = PathCompleter(get_paths=lambda: [str(repo)], expanduser=False)
        custom = lambda: [f"/{name}" for name in load_commands(repo, builtins=BUILTIN_NAMES).commands]  # noqa: E731
        self.commands = WordCompleter(lambda: [*SLASH_COMMANDS, *custom()], sentence=True)

    def get_completions(self, document: Document, complete_event: Any) -> Iterable[Completion]:
        before = document.text_before_cursor
        if before.startswith("/") and " " not in before:
            yield from self.commands.get_completions(document, complete_event)
            return
        command, _, argument = before.partition(" ")
        if command in _SLASH_ARGUMENTS and " " not in argument:
            for choice in _SLASH_ARGUMENTS[command]:
                if choice.startswith(argument):
                    yield Completion(choice, start_position=-len(argument))
            return
        word = document.get_word_before_cursor(WORD=True)
        if word.startswith("@"):
            inner = Document(word[1:], len(word) - 1)
            yield from self.paths.get_completions(inner, complete_event)


def _key_bindings() -> KeyBindings:
    bindings = KeyBindings()

    @bindings.add("enter")
    def _send_or_continue(event: Any) -> None:
        buffer = event.current_buffer
        if buffer.document.text_before_cursor.endswith("\\"):
            buffer.delete_before_cursor(1)
            buffer.insert_text("\n")
        else:
            buffer.validate_and_handle()

    @bindings.add("escape", "enter")
    def _new_line(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    return bindings


# --- the loop --------------------------------------------------------------------------------------

@dataclass
class Repl:
    settings: Settings
    repo: Path
    parts: AgentParts
    backend_name: str
    stats: RunStats
    renderer: TerminalRenderer
    console: Console
    read_input: Callable[[], str]
    unattended: bool = False  # --yes: commands run without anyone seeing them first
    servers: McpServers | None = None
    _done: bool = field(default=False, init=False)
    _cancel: threading.Event = field(default_factory=threading.Event, init=False)
    _stopped_at: float | None = field(default=None, init=False)  # when Ctrl-C last stopped an answer

    def stop_current(self) -> None:
        """Stop the answer in progress (Ctrl-C at an approval prompt)."""
        self._cancel.set()

    def loop(self) -> int:
        """Read and answer until the user leaves; returns the exit code."""
        interrupted_once = False
        while not self._done:
            try:
                text = self.read_input()
            except KeyboardInterrupt:
                if self._stopped_at is not None and time.monotonic() - self._stopped_at < SECOND_PRESS_S:
                    # "stopping… (Ctrl-C again to leave)": the stop was done before the second press
                    raise Interrupted("interrupted") from None
                if interrupted_once:
                    return 0
                interrupted_once = True
                self.console.print(Text("(Ctrl-C again, Ctrl-D or /exit to leave)", style="dim"))
                continue
            except EOFError:
                return 0
            interrupted_once, self._stopped_at = False, None
            text = text.strip()
            if not text:
                continue
            if text.startswith("/"):
                self.slash(text)
            else:
                self.send(text)
        return 0

    def send(self, text: str) -> None:
        message, attached = expand_attachments(text, self.repo)
        if attached:
            self.console.print(Text(f"attached: {', '.join(attached)}", style="dim"))
        self._cancel = threading.Event()

        def stopping() -> None:
            if self.servers is not None:
                self.servers.interrupt()
            self.console.print(Text("\nstopping… (Ctrl-C again to leave)", style="yellow"))

        with ctrl_c_cancels(self._cancel, on_first=stopping):
            result = self.parts.agent.run(message, cancel=self._cancel)
        self._stopped_at = time.monotonic() if self._cancel.is_set() else None
        self.renderer.pause()
        problem = describe_failure(result)
        if problem:
            self.console.print(Text(problem, style="bold red" if result.status == "error" else "yellow"))
        self.console.print(Text(self.stats.status_line(), style="dim"))

    # slash commands

    def slash(self, line: str) -> None:
        command, _, argument = line.partition(" ")
        handler = getattr(self, "cmd_" + command[1:], None) if command in BUILTIN_NAMES else None
        if handler is not None:
            handler(argument.strip())
            return
        custom = self.custom_commands().get(command[1:])
        if custom is None:
            self.console.print(Text(f"unknown command {command}; /help lists them", style="yellow"))
            return
        self.say(f"{command}: {custom.description}", "dim")
        self.send(custom.render(argument))

    def custom_commands(self) -> CommandSet:
        return load_commands(self.repo, builtins=BUILTIN_NAMES)

    def say(self, text: str, style: str = "") -> None:
        self.console.print(Text(text, style=style))

    def cmd_help(self, argument: str) -> None:
        for command, description in SLASH_COMMANDS.items():
            self.say(f"{command:<10} {description}")
        custom = self.custom_commands()
        if custom.commands:
            self.say("custom commands (.glmcode/commands/, ~/.config/glmcode/commands/):", "bold")
            for name, command in custom.commands.items():
                self.say(f"/{name:<9} {command.summary()}")
        for problem in custom.problems:  # unwrapped: the paths in them stay whole to copy
            self.console.print(Text(problem, style="yellow"), soft_wrap=True)
        self.say("Enter sends; Esc Enter or a trailing \\ adds a line; @path attaches a file; "
                 "Ctrl-C stops an answer; Ctrl-D leaves.", "dim")

    def cmd_think(self, argument: str) -> None:
        if argument in ("on", "off"):
            self.parts.agent.set_thinking(argument == "on")
            self.say(f"thinking {argument}")
        elif argument in ("show", "hide"):
            self.renderer.show_thinking = argument == "show"
            self.say(f"thinking display: {'full' if argument == 'show' else 'one line'}")
        elif not argument:
            reasoning = self.renderer.last_reasoning.strip()
            self.say(reasoning if reasoning else "no thinking in the last answer", "dim italic")
        else:
            self.say("usage: /think on|off|show|hide", "yellow")

    def cmd_mode(self, argument: str) -> None:
        if argument not in APPROVAL_MODES:
            self.say(f"mode: {self.parts.approver.mode.value} (choose from {', '.join(APPROVAL_MODES)})")
            return
        self.parts.approver.mode = ApprovalMode(argument)
        self.say(f"mode: {argument}")
        sandbox = sandbox_for_mode(self.settings, self.repo, argument, unattended=self.unattended)
        if sandbox is not None:
            before = self.parts.workspace.sandbox.name
            self.parts.workspace.sandbox = sandbox
            if sandbox.name != before:
                self.say(sandbox_line(sandbox))

    def cmd_diff(self, argument: str) -> None:
        diff = self.parts.agent.checkpoints.diff()
        if diff.strip():
            self.renderer.print_diff(diff)
        else:
            self.say("no changes in this session")

    def cmd_undo(self, argument: str) -> None:
        changed = self.parts.agent.undo()
        self.say(f"undone: {', '.join(changed)}" if changed else "nothing to undo")

    def cmd_clear(self, argument: str) -> None:
        self.parts.agent.clear()
        self.stats.context_used = 0
        self.say("conversation cleared")

    def cmd_compact(self, argument: str) -> None:
        self.parts.agent.compact()
        self.renderer.pause()
        self.say(self.stats.status_line(), "dim")

    def cmd_model(self, argument: str) -> None:
        window = f", context window {self.stats.context_window:,} tokens" if self.stats.context_window else ""
        self.say(f"{self.stats.model} via {self.backend_name}{window}")

    def cmd_tokens(self, argument: str) -> None:
        s = self.stats
        window = f" of {s.context_window:,}" if s.context_window else ""
        self.say(f"context: {s.context_used:,}{window} tokens")
        self.say(f"this session: {s.prompt_tokens:,} prompt ({s.cached_tokens:,} from the prefix cache), "
                 f"{s.completion_tokens:,} generated")
        if s.tokens_per_second is not None:
            self.say(f"last speed: {s.tokens_per_second:.1f} tokens/s")

    def cmd_sessions(self, argument: str) -> None:
        from glmcode.agent.session import SessionStore

        current = self.parts.session.id
        for info in SessionStore(self.settings.sessions_path()).list(repo=str(self.repo))[:20]:
            marker = "*" if info.id == current else " "
            self.say(f"{marker} {info.id}  {' '.join(info.first_user_message.split())[:60]}")
        self.say("resume one with: glmcode chat --resume ID", "dim")

    def cmd_mcp(self, argument: str) -> None:
        states = list(self.servers.states.values()) if self.servers is not None else []
        if not states:
            self.say("no MCP servers configured ([mcp_servers.NAME] in the config; see `glmcode mcp add`)")
        for state in states:
            if state.running:
                tools = ", ".join(tool.name for tool in state.tools) or "no tools"
                self.say(f"✓ {state.name} ({state.config.transport}): {tools}")
            else:
                self.say(f"✗ {state.name}: {state.error}", "yellow")

    def cmd_exit(self, argument: str) -> None:
        self._done = True

    cmd_quit = cmd_exit


def sandbox_line(sandbox: Sandbox) -> str:
    if sandbox.unavailable is not None:
        return f"commands will be refused: {sandbox.unavailable}"
    if sandbox.policy is None:
        return "commands run unsandboxed, each after you approve it (--sandbox workspace-write confines them)"
    return f"commands run in the {sandbox.name} sandbox"


def take_ctrl_c() -> None:
    """A chat is a person at a terminal, so Ctrl-C must reach it, even when it was started with
    SIGINT ignored (from a background job, a script's `&`, nohup): that disposition is inherited
    and would make every Ctrl-C outside an answer (while the model loads, say) do nothing."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.default_int_handler)


def run_repl(settings: Settings, repo: Path, *, replay: Path | None, resume: str | None, yes: bool) -> int:
    take_ctrl_c()
    console = Console(highlight=False)
    stats = RunStats(model=model_label(settings, replay))
    renderer = TerminalRenderer(stats, console, show_thinking=settings.show_thinking)
    backend = open_backend(settings, replay=replay, show_progress=True)
    servers: McpServers | None = None
    try:
        stats.context_window = backend.context_window
        session = open_session(settings, repo, resume=resume, meta={"command": "chat"})
        approval_prompt = ApprovalPrompt(renderer, console, ask_line)
        ask = (lambda request: True) if yes else approval_prompt
        sandbox = command_sandbox(settings, repo, unattended=yes)
        servers = start_mcp_servers(settings, repo, show_progress=True)
        parts = build_agent(settings, backend, repo, read_only=False, ask=ask, on_event=renderer.event,
                            session=session, sandbox=sandbox, mcp=servers)
        history = data_home() / "history"
        history.parent.mkdir(parents=True, exist_ok=True)
        history.touch(mode=0o600)  # what the user typed may hold secrets: keep it private
        history.chmod(0o600)
        prompt_session: PromptSession[str] = PromptSession(
            history=FileHistory(str(history)),
            completer=ReplCompleter(repo),
            complete_while_typing=False,
            key_bindings=_key_bindings(),
            multiline=True,
            bottom_toolbar=lambda: f" {stats.status_line()} · mode {parts.approver.mode.value} · /help",
        )
        console.print(Text(f"glmcode · {stats.model} via {backend_label(settings, replay, backend)} · {repo}", style="bold"))
        console.print(Text(sandbox_line(sandbox), style="yellow" if sandbox.unavailable else "dim"))
        if resume is not None:
            console.print(Text(f"resumed session {session.id} ({len(parts.agent.messages)} messages)", style="dim"))
        for warning in [*servers.warnings(), *load_commands(repo, builtins=BUILTIN_NAMES).problems]:
            console.print(Text(warning, style="yellow"), soft_wrap=True)
        console.print(Text("Type a request, /help for commands, Ctrl-D to leave.", style="dim"))
        repl = Repl(settings, repo, parts, backend_label(settings, replay, backend), stats, renderer, console,
                    read_input=lambda: prompt_session.prompt(HTML("<b>› </b>"), prompt_continuation="  "),
                    unattended=yes, servers=servers)
        approval_prompt.on_interrupt = repl.stop_current
        return repl.loop()
    finally:
        if servers is not None:
            servers.close()
        backend.close()
