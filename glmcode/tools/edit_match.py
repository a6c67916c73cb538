"""Find `old_string` in a file the way a model means it, and replace it with `new_string`.

Models copy text imperfectly: trailing spaces go missing, indentation shifts, read_file's line
numbers sneak in. The matcher tries, in order: the exact text, then whole lines ignoring trailing
whitespace, ignoring the block's common indentation, and ignoring all surrounding whitespace. A
line-based match re-indents the replacement to where it landed. It never guesses between several
places: an ambiguous match is refused with their line numbers, and a miss shows the closest lines.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass

from glmcode.tools.workspace import ToolError

_LINE_NUMBER_PREFIX = re.compile(r"^ *\d+\t")


@dataclass(frozen=True)
class Replacement:
    text: str  # the whole new file text
    count: int  # how many places were replaced
    first_line: int  # 1-based line where the first replacement starts
    strategy: str  # "exact" or how the lines were matched


def apply_edit(text: str, old: str, new: str, *, replace_all: bool = False) -> Replacement:
    """Replace `old` by `new` in `text` (all "\\n" newlines); ToolError says why it cannot."""
    if not old:
        raise ToolError("old_string is empty; to create or overwrite a whole file use write_file")
    if old == new:
        raise ToolError("old_string and new_string are identical; nothing to change")
    found = _exact(text, old, new, replace_all) or _by_lines(text, old, new, replace_all)
    if found is None and _has_line_numbers(old):
        stripped_new = _strip_line_numbers(new) if _has_line_numbers(new) else new
        found = _by_lines(text, _strip_line_numbers(old), stripped_new, replace_all)
    if found is None:
        raise ToolError(_no_match_message(text, old, new))
    return found


def _exact(text: str, old: str, new: str, replace_all: bool) -> Replacement | None:
    starts = [m.start() for m in re.finditer(re.escape(old), text)]
    if not starts:
        return None
    lines = [text.count("\n", 0, start) + 1 for start in starts]
    if len(starts) > 1 and not replace_all:
        raise ToolError(_ambiguous_message(lines))
    updated = text.replace(old, new) if replace_all else text.replace(old, new, 1)
    return Replacement(updated, len(starts), lines[0], "exact")


def _rstripped(lines: list[str]) -> list[str]:
    return [line.rstrip() for line in lines]


def _dedented(lines: list[str]) -> list[str]:
    cut = min((_indent_width(line) for line in lines if line.strip()), default=0)
    return [line[cut:].rstrip() if line.strip() else "" for line in lines]


def _stripped(lines: list[str]) -> list[str]:
    return [line.strip() for line in lines]


_LINE_MATCHERS: list[tuple[str, Callable[[list[str]], list[str]]]] = [
    ("ignoring trailing whitespace", _rstripped),
    ("ignoring indentation", _dedented),
    ("ignoring surrounding whitespace", _stripped),
]


def _by_lines(text: str, old: str, new: str, replace_all: bool) -> Replacement | None:
    file_lines = text.split("\n")
    old_lines = old.strip("\n").split("\n")
    new_lines = new.strip("\n").split("\n") if new.strip("\n") else []
    if not any(line.strip() for line in old_lines):
        return None
    size = len(old_lines)
    for strategy, key in _LINE_MATCHERS:
        wanted = key(old_lines)
        starts: list[int] = []
        for i in range(len(file_lines) - size + 1):
            if (not starts or i >= starts[-1] + size) and key(file_lines[i:i + size]) == wanted:
                starts.append(i)
        if not starts:
            continue
        if len(starts) > 1 and not replace_all:
            raise ToolError(_ambiguous_message([s + 1 for s in starts]))
        for start in reversed(starts):
            block = file_lines[start:start + size]
            file_lines[start:start + size] = _reindent(new_lines, old_lines, block)
        return Replacement("\n".join(file_lines), len(starts), starts[0] + 1, strategy)
    return None


def _reindent(new_lines: list[str], old_lines: list[str], matched: list[str]) -> list[str]:
    """Shift `new_lines` by the difference between the old block's indentation and the file's."""
    old_indent, file_indent = _first_indent(old_lines), _first_indent(matched)
    if old_indent == file_indent:
        return new_lines
    shifted = []
    for line in new_lines:
        if not line.strip():
            shifted.append("")
        elif line.startswith(old_indent):
            shifted.append(file_indent + line[len(old_indent):])
        else:  # shallower than the block it replaces: align it with the block
            shifted.append(file_indent + line.lstrip())
    return shifted


def _first_indent(lines: list[str]) -> str:
    line = next((line for line in lines if line.strip()), "")
    return line[: _indent_width(line)]


def _indent_width(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def _has_line_numbers(text: str) -> bool:
    lines = [line for line in text.strip("\n").split("\n") if line.strip()]
    return bool(lines) and all(_LINE_NUMBER_PREFIX.match(line) for line in lines)


def _strip_line_numbers(text: str) -> str:
    return "\n".join(_LINE_NUMBER_PREFIX.sub("", line) for line in text.split("\n"))


def _ambiguous_message(lines: list[int]) -> str:
    where = ", ".join(str(n) for n in lines[:20]) + (", ..." if len(lines) > 20 else "")
    return (
        f"old_string matches {len(lines)} places (starting at lines {where}); include more surrounding "
        "lines to make it unique, or set replace_all to true to change every one"
    )


def _no_match_message(text: str, old: str, new: str) -> str:
    message = "old_string was not found in the file (also tried ignoring whitespace and indentation)."
    file_lines = text.split("\n")
    start, ratio = _closest_block(file_lines, old.strip("\n").split("\n"))
    if ratio >= 0.4:
        size = len(old.strip("\n").split("\n"))
        shown = "\n".join(f"{n + 1:6}\t{file_lines[n]}" for n in range(start, min(start + size, len(file_lines))))
        message += f" The most similar lines ({ratio:.0%} alike) are:\n{shown}\n"
    if new.strip() and new.strip() in text:
        line = text.count("\n", 0, text.index(new.strip())) + 1
        message += f" new_string is already in the file at line {line}: the edit may already be applied."
    return message + " Read the file again and copy old_string exactly (without the line-number prefix)."


def _closest_block(file_lines: list[str], old_lines: list[str]) -> tuple[int, float]:
    """The start of the window of len(old_lines) lines most similar to old_lines, and the similarity."""
    wanted = "\n".join(_stripped(old_lines))
    matcher = difflib.SequenceMatcher(autojunk=False)
    matcher.set_seq2(wanted)
    best, best_ratio = 0, 0.0
    for i in range(max(1, len(file_lines) - len(old_lines) + 1)):
        matcher.set_seq1("\n".join(_stripped(file_lines[i:i + len(old_lines)])))
        if matcher.real_quick_ratio() > best_ratio and matcher.quick_ratio() > best_ratio:
            ratio = matcher.ratio()
            if ratio > best_ratio:
                best, best_ratio = i, ratio
    return best, best_ratio
