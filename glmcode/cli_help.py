"""How `glmcode --help` reads: plain text laid out like git's or ripgrep's help.

    Usage: glmcode ask [OPTIONS] PROMPT
    ...
    Model:
      --model DIR                Checkpoint directory (env GLMCODE_MODEL).
      -q, --quantization SCHEME  Weight-only: int4 (...), int4-all or int8.

Flags show no value placeholder; options show their own (`DIR`, `N`; the option's name in
capitals when it declares none); arguments are named in capitals. Options are grouped under
their `rich_help_panel` ("Options" when they have none), in the order they first appear.
Every command and group of the CLI uses these classes (`cls=Command` / `cls=Group`).
"""

from __future__ import annotations

import textwrap
from typing import Any

from typer.core import TyperCommand, TyperGroup

OTHER_OPTIONS = "Options"


class _PlainHelp:
    def format_help(self, ctx: Any, formatter: Any) -> None:
        self.format_usage(ctx, formatter)  # type: ignore[attr-defined]
        self.format_help_text(ctx, formatter)  # type: ignore[attr-defined]
        for title, rows in _sections(self, ctx):
            with formatter.section(title):
                _write_rows(formatter, rows)
        self.format_epilog(ctx, formatter)  # type: ignore[attr-defined]

    def collect_usage_pieces(self, ctx: Any) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []  # type: ignore[attr-defined]
        for param in self.get_params(ctx):  # type: ignore[attr-defined]
            if param.param_type_name == "argument":
                name = _argument_name(param)
                pieces.append(name if param.required else f"[{name}]")
        if getattr(self, "subcommand_metavar", None):
            pieces.append(self.subcommand_metavar)  # type: ignore[attr-defined]
        return pieces


class Command(_PlainHelp, TyperCommand):
    """A command whose --help reads plainly."""


class Group(_PlainHelp, TyperGroup):
    """A group of commands whose --help reads plainly."""


def _sections(command: Any, ctx: Any) -> list[tuple[str, list[tuple[str, str]]]]:
    sections: dict[str, list[tuple[str, str]]] = {}
    for param in command.get_params(ctx):
        if getattr(param, "hidden", False):
            continue
        if param.param_type_name == "argument":
            sections.setdefault("Arguments", []).append((_argument_name(param), getattr(param, "help", "") or ""))
        else:
            panel = getattr(param, "rich_help_panel", None) or OTHER_OPTIONS
            sections.setdefault(panel, []).append((_option_names(param), _option_help(param)))
    if OTHER_OPTIONS in sections:  # the general ones (--help among them) come last
        sections[OTHER_OPTIONS] = sections.pop(OTHER_OPTIONS)
    commands = _command_rows(command, ctx)
    if commands:
        sections["Commands"] = commands
    return list(sections.items())


def _argument_name(param: Any) -> str:
    return (param.metavar or param.name).upper() + ("..." if param.nargs != 1 else "")


def _option_names(param: Any) -> str:
    names = sorted(param.opts, key=lambda name: name.startswith("--"))  # -q before --quantization
    text = ", ".join(names + list(param.secondary_opts))
    if param.is_flag:
        return text
    return f"{text} {param.metavar or param.name.upper()}"


def _option_help(param: Any) -> str:
    text = param.help or ""
    if not param.is_flag and param.default is not None and param.show_default is not False:
        text += f" (default: {param.default})"
    return text


def _command_rows(group: Any, ctx: Any) -> list[tuple[str, str]]:
    if not hasattr(group, "list_commands"):
        return []
    rows = []
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        if command is not None and not command.hidden:
            rows.append((name, command.get_short_help_str(limit=200)))
    return rows


def _write_rows(formatter: Any, rows: list[tuple[str, str]], name_width: int = 30) -> None:
    """Two columns, the second wrapped at spaces only (`stream-json` stays whole)."""
    indent = " " * formatter.current_indent
    width = min(max(len(name) for name, _ in rows), name_width) + 2
    wrap_width = max(formatter.width - formatter.current_indent - width, 20)
    for name, text in rows:
        lines = textwrap.wrap(text, wrap_width, break_on_hyphens=False) or [""]
        if len(name) + 2 > width:
            formatter.write(f"{indent}{name}\n")
            first = f"{indent}{' ' * width}{lines[0]}"
        else:
            first = f"{indent}{name:<{width}}{lines[0]}"
        formatter.write(first.rstrip() + "\n")
        for line in lines[1:]:
            formatter.write(f"{indent}{' ' * width}{line}\n")
