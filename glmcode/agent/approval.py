"""Who may do what: approval modes, command allow/deny rules, and the human's yes or no.

Modes: `plan` allows only read-only tools; `ask` asks before every edit and command; `auto-edit`
edits freely and asks before commands; `yolo` allows everything. Command rules are prefixes of
a command's words ("git push", "pytest"). They are checked on every simple command of a shell
line (`a && b`, `a; b`, `a | b`, `$(b)`), after env assignments and wrappers such as `env` or
`sudo`, so `FOO=1 git push -f` and `ls && git push` are caught. A deny rule always wins, even in
yolo; a command whose every part is allowed runs without asking. Tools that run like commands
without being shell lines (MCP tools) are matched by their `rule_name`, deny rules even when the
tool is read-only.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from glmcode.options import ApprovalMode
from glmcode.tools.base import Tool

__all__ = ["ApprovalMode", "ApprovalRequest", "Approver", "CommandRules", "Decision", "split_commands"]


@dataclass(frozen=True)
class ApprovalRequest:
    tool_name: str
    arguments: dict[str, Any]
    preview: str | None  # the diff of an edit, or the command line


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str  # for a refusal: what the model is told


# Words that run the rest of the line as a command of its own.
_WRAPPERS = {"env", "command", "exec", "nohup", "time", "sudo", "nice", "xargs", "builtin", "timeout"}
_SHELLS = {"sh", "bash", "zsh", "dash"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


def split_commands(line: str) -> list[list[str]]:
    """The simple commands of a shell line as word lists, each stripped down to what it runs.

    Deliberately conservative: the union of a shlex parse (which keeps `sh -c "..."` intact) and a
    rough split that ignores quoting (which exposes `"$(git push)"` inside quotes).
    """
    commands: list[list[str]] = []
    for words in _shlex_commands(line) + _rough_commands(line):
        if words not in commands:
            commands.append(words)
    return commands


def _shlex_commands(line: str) -> list[list[str]]:
    lexer = shlex.shlex(line.replace("\n", " ; "), posix=True, punctuation_chars=";&|(){}`")
    lexer.whitespace_split = True
    try:
        words = list(lexer)
    except ValueError:  # unbalanced quotes: the rough split still sees the words
        return []
    commands: list[list[str]] = []
    current: list[str] = []
    for word in words + [";"]:
        if set(word) <= set(";&|(){}`!"):
            commands.extend(_unwrap(current))
            current = []
        else:
            current.append(word)
    return commands


def _rough_commands(line: str) -> list[list[str]]:
    unquoted = re.sub(r"[\"'\\]", " ", line)
    return [words for piece in re.split(r"[;&|(){}`!\n]", unquoted) for words in _unwrap(piece.split(), rough=True)]


def _unwrap(words: list[str], rough: bool = False) -> list[list[str]]:
    """Drop leading env assignments and wrappers; look inside `sh -c "..."`.

    `rough` words have lost their quotes, so `sh -c` is simply dropped from the front.
    """
    while words:
        head = words[0]
        if rough and head.rsplit("/", 1)[-1] in _SHELLS and words[1:2] == ["-c"]:
            words = words[2:]
        elif _ASSIGNMENT.match(head):
            words = words[1:]
        elif head.rsplit("/", 1)[-1] in _WRAPPERS:
            words = words[1:]
            while words and (words[0].startswith("-") or _ASSIGNMENT.match(words[0]) or words[0].isdigit()):
                words = words[1:]  # the wrapper's own options (sudo -u x is rare enough to ignore)
        else:
            break
    if not words:
        return []
    words = [words[0].rsplit("/", 1)[-1]] + words[1:]  # /usr/bin/git -> git
    if words[0] in _SHELLS and "-c" in words[1:-1]:
        return split_commands(words[words.index("-c") + 1])
    return [words]


def _matches(rule: str, words: list[str]) -> bool:
    rule_words = shlex.split(rule)
    return bool(rule_words) and words[: len(rule_words)] == rule_words


@dataclass(frozen=True)
class CommandRules:
    allow: list[str] = field(default_factory=list)
    deny: list[str] = field(default_factory=list)

    def denied(self, line: str) -> str | None:
        """The deny rule that some part of `line` matches, if any."""
        for words in split_commands(line):
            for rule in self.deny:
                if _matches(rule, words):
                    return rule
        return None

    def allowed(self, line: str) -> bool:
        """True when every part of `line` matches an allow rule."""
        commands = split_commands(line)
        return bool(commands) and all(any(_matches(rule, words) for rule in self.allow) for words in commands)


_PLAN_REFUSAL = (
    "Refused: glmcode is in plan mode, where only read-only tools run. Do not try to change files or "
    "run commands: investigate with the read-only tools and present your plan; the user can switch "
    "modes (/mode) to carry it out."
)
_NOBODY_REFUSAL = (
    "Refused: {what} needs the user's approval in {mode} mode, and nobody can answer (non-interactive "
    "run). Continue with read-only tools and say what you would do, or the user can rerun with a more "
    "permissive approval mode or an allow rule for the command."
)


class Approver:
    def __init__(self, mode: ApprovalMode | str = ApprovalMode.ASK, rules: CommandRules = CommandRules(),
                 ask: Callable[[ApprovalRequest], bool] | None = None):
        self.mode = mode
        self.rules = rules
        self.ask = ask

    @property
    def mode(self) -> ApprovalMode:
        return self._mode

    @mode.setter
    def mode(self, value: ApprovalMode | str) -> None:
        self._mode = ApprovalMode(value)

    def decide(self, tool: Tool, arguments: dict[str, Any], preview: str | None = None) -> Decision:
        """May this call run? Read tools always may; the rest depends on the mode, rules and the human."""
        line = tool.rule_name or str(arguments.get("command") or preview or "")
        if tool.kind == "read":
            refusal = self._denied(line) if tool.rule_name else None
            return refusal or Decision(True, "read-only")
        if self.mode is ApprovalMode.PLAN:
            return Decision(False, _PLAN_REFUSAL)
        if tool.kind == "command":
            refusal = self._denied(line)
            if refusal is not None:
                return refusal
            if self.mode is ApprovalMode.YOLO:
                return Decision(True, "yolo mode")
            if line and self.rules.allowed(line):
                return Decision(True, "allowed by the user's rules")
        elif self.mode in (ApprovalMode.AUTO_EDIT, ApprovalMode.YOLO):
            return Decision(True, f"{self.mode.value} mode")
        return self._ask_human(tool, arguments, preview)

    def _denied(self, line: str) -> Decision | None:
        rule = self.rules.denied(line) if line else None
        if rule is None:
            return None
        return Decision(False, f"Refused: the user's rules deny `{rule}` commands. Do not retry it in another "
                               "form; find another way or tell the user what is needed.")

    def _ask_human(self, tool: Tool, arguments: dict[str, Any], preview: str | None) -> Decision:
        what = "running a command" if tool.kind == "command" else "changing files"
        if self.ask is None:
            return Decision(False, _NOBODY_REFUSAL.format(what=f"{tool.name} ({what})", mode=self.mode.value))
        if self.ask(ApprovalRequest(tool.name, arguments, preview)):
            return Decision(True, "approved by the user")
        return Decision(False, f"Refused: the user declined this {tool.name} call. Do not repeat it; ask the "
                               "user what they want instead, or try a different approach.")
