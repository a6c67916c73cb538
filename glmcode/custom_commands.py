"""Custom slash commands: Markdown prompt files kept by a repository or a user.

`.glmcode/commands/NAME.md` (the repository's, shared with its team) and
`~/.config/glmcode/commands/NAME.md` (the user's, for every repository) become `/NAME args` in the
REPL and `glmcode run NAME args` in scripts; a file in a subfolder, `git/squash.md`, is
`/git:squash`. The file is the prompt sent to the agent:

    ---
    description: Review a file for bugs
    argument-hint: FILE [FOCUS]
    ---
    Review $1 for bugs, above all $2. (All I typed: $ARGUMENTS)

`$ARGUMENTS` is everything after the name; `$1`, `$2`... are its words (shell quoting groups
them); a missing one is empty. Arguments given to a file that uses neither are appended to the
prompt. The front matter is optional; without a `description` the first line of the prompt
describes the command.

Where names meet: a repository command replaces a user command of the same name (`/help` says
so), and a command named like a built-in (`/help`, `/undo`...) is not loaded: it is reported,
never silently shadowed or shadowing.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from glmcode.errors import UsageError
from glmcode.settings import config_home

REPO_DIR = Path(".glmcode") / "commands"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_POSITIONAL = re.compile(r"\$(?:(\d+)|\{(\d+)\})")
_MAX_BYTES = 256_000


def user_commands_dir(env: Mapping[str, str] = os.environ) -> Path:
    return config_home(env) / "commands"


@dataclass(frozen=True)
class CustomCommand:
    name: str
    path: Path
    scope: str  # "repo" or "user"
    body: str
    description: str = ""
    argument_hint: str = ""
    overrides: Path | None = None  # the user command a repo command replaces

    def render(self, arguments: str, words: list[str] | None = None) -> str:
        """The prompt, with $ARGUMENTS and $1... replaced by what was typed after the name
        (`words`: the arguments already split, as a shell splits a command line)."""
        arguments = arguments.strip()
        words = _words(arguments) if words is None else words
        uses_arguments = "$ARGUMENTS" in self.body or _POSITIONAL.search(self.body)

        def positional(match: re.Match[str]) -> str:
            index = int(match.group(1) or match.group(2))
            return words[index - 1] if 0 < index <= len(words) else ""

        prompt = _POSITIONAL.sub(positional, self.body.replace("$ARGUMENTS", arguments)).strip()
        if arguments and not uses_arguments:
            prompt += f"\n\nArguments: {arguments}"
        return prompt

    def summary(self) -> str:
        """One line for /help."""
        hint = f" {self.argument_hint}" if self.argument_hint else ""
        where = f"{self.scope}" + (", overrides the user command" if self.overrides else "")
        return f"{self.description}{hint and f'  (args:{hint})'}  [{where}]".strip()


@dataclass
class CommandSet:
    commands: dict[str, CustomCommand] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)  # files left out, and why (one line each)

    def get(self, name: str) -> CustomCommand | None:
        return self.commands.get(name)

    def require(self, name: str) -> CustomCommand:
        """The command, or a UsageError that says where glmcode looked and what there is."""
        command = self.commands.get(name)
        if command is not None:
            return command
        clash = next((problem for problem in self.problems if problem.startswith(f"/{name} ")), None)
        if clash:
            raise UsageError(clash)
        known = ", ".join(sorted(self.commands)) or "none"
        raise UsageError(f"no custom command '{name}': add {REPO_DIR / name}.md to the repository or "
                         f"{user_commands_dir() / name}.md (custom commands here: {known})")


def load_commands(repo_root: Path, *, builtins: Iterable[str] = (), env: Mapping[str, str] = os.environ) -> CommandSet:
    """The repository's and the user's commands; `builtins` are names they may not take."""
    reserved = {name.lstrip("/") for name in builtins}
    found = CommandSet()
    user = _scan(user_commands_dir(env), "user", found.problems)
    repo = _scan(Path(repo_root) / REPO_DIR, "repo", found.problems)
    for name, command in sorted({**user, **repo}.items()):
        if name in reserved:
            found.problems.append(f"/{name} ({command.path}) is not available: /{name} is a built-in command; "
                                  "rename the file")
            continue
        if command.scope == "repo" and name in user:
            command = replace(command, overrides=user[name].path)
        found.commands[name] = command
    return found


def _scan(directory: Path, scope: str, problems: list[str]) -> dict[str, CustomCommand]:
    commands: dict[str, CustomCommand] = {}
    if not directory.is_dir():
        return commands
    for path in sorted(directory.rglob("*.md")):
        parts = path.relative_to(directory).with_suffix("").parts
        if not all(_NAME.match(part) for part in parts):
            problems.append(f"{path}: skipped: command names use letters, digits, '.', '-' and '_'")
            continue
        name = ":".join(parts)
        try:
            command = parse_command(name, path, scope)
        except UnicodeDecodeError:
            problems.append(f"{path}: skipped: not UTF-8 text")
            continue
        except (OSError, ValueError) as error:
            problems.append(f"{path}: skipped: {getattr(error, 'strerror', None) or error}")
            continue
        commands[name] = command
    return commands


def parse_command(name: str, path: Path, scope: str) -> CustomCommand:
    data = path.read_bytes()
    if len(data) > _MAX_BYTES:
        raise ValueError(f"larger than {_MAX_BYTES // 1000} KB")
    text = data.decode("utf-8").replace("\r\n", "\n")
    meta, body = _front_matter(text)
    if not body.strip():
        raise ValueError("the prompt is empty")
    description = meta.get("description") or _first_line(body)
    return CustomCommand(name, path, scope, body, description, meta.get("argument-hint", ""))


def _front_matter(text: str) -> tuple[dict[str, str], str]:
    """`key: value` lines between a first line `---` and the next `---` line, and the rest."""
    lines = text.split("\n")
    if lines[0].strip() != "---":
        return {}, text
    end = next((index for index in range(1, len(lines)) if lines[index].strip() == "---"), None)
    if end is None:
        raise ValueError("the front matter opened with --- is never closed")
    meta: dict[str, str] = {}
    for line in lines[1:end]:
        key, colon, value = line.partition(":")
        if colon and key.strip():
            meta[key.strip().lower().replace("_", "-")] = value.strip().strip("\"'")
    return meta, "\n".join(lines[end + 1 :])


def _first_line(body: str) -> str:
    line = next((line.strip().lstrip("#").strip() for line in body.splitlines() if line.strip()), "")
    return line if len(line) <= 70 else line[:67] + "..."


def _words(arguments: str) -> list[str]:
    try:
        return shlex.split(arguments)
    except ValueError:  # an unbalanced quote: plain words are the best guess
        return arguments.split()
