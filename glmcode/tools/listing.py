"""Which files a repository holds: git's view when it is a git repo, a .gitignore-aware walk if not.

Both skip `.git/`, glmcode's own state directory `.glmcode/`, and installed dependencies that
are not ignored: virtualenvs (a directory holding `pyvenv.cfg`) and `node_modules/`. Those hold
tens of thousands of files that are not the project's, and would bury it (and the repo map).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

STATE_DIR = ".glmcode"
_ALWAYS_SKIPPED = {".git", STATE_DIR}


_DEPENDENCY_DIR_NAMES = {"node_modules"}
_VENV_MARKER = "pyvenv.cfg"


def list_repo_files(root: Path, use_git: bool) -> list[str]:
    """Sorted POSIX paths, relative to `root`, of the (non-ignored) files under it."""
    files = _git_files(root) if use_git else _walk_files(root)
    venvs = tuple(f.removesuffix(_VENV_MARKER) for f in files if f.endswith("/" + _VENV_MARKER))
    return sorted(f for f in files if f.split("/")[0] not in _ALWAYS_SKIPPED and not _is_dependency(f, venvs))


def _is_dependency(path: str, venv_prefixes: tuple[str, ...]) -> bool:
    return path.startswith(venv_prefixes) or not _DEPENDENCY_DIR_NAMES.isdisjoint(path.split("/")[:-1])


def _git_files(root: Path) -> list[str]:
    done = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root, capture_output=True, check=True,
    )
    names = {name.decode("utf-8", "surrogateescape") for name in done.stdout.split(b"\0") if name}
    # --cached still lists files deleted from the working tree; submodules show up as directories.
    return [name for name in names if (root / name).is_file() or (root / name).is_symlink()]


def _walk_files(root: Path) -> list[str]:
    found: list[str] = []
    rules_by_dir: dict[str, list[_IgnoreRule]] = {}
    for current, dirs, files in os.walk(root):
        rel_dir = Path(current).relative_to(root).as_posix()
        rel_dir = "" if rel_dir == "." else rel_dir
        rules = rules_by_dir.get(rel_dir, []) + _read_gitignore(Path(current) / ".gitignore", rel_dir)
        kept_dirs = []
        for name in sorted(dirs):
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if name in _ALWAYS_SKIPPED or _ignored(rules, rel, is_dir=True):
                continue
            if name in _DEPENDENCY_DIR_NAMES or (Path(current) / name / _VENV_MARKER).is_file():
                continue
            kept_dirs.append(name)
            rules_by_dir[rel] = rules
        dirs[:] = kept_dirs
        for name in files:
            rel = f"{rel_dir}/{name}" if rel_dir else name
            if not _ignored(rules, rel, is_dir=False):
                found.append(rel)
    return found


@dataclass(frozen=True)
class _IgnoreRule:
    regex: re.Pattern[str]
    negated: bool
    dir_only: bool


def _read_gitignore(path: Path, base: str) -> list[_IgnoreRule]:
    """A simple .gitignore reader: comments, `!` negation, trailing `/`, anchoring, `*`, `?`, `**`."""
    if not path.is_file():
        return []
    rules = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        line = line.rstrip()
        if not line or line.startswith("#"):
            continue
        negated = line.startswith("!")
        pattern = line[1:] if negated else line
        dir_only = pattern.endswith("/")
        pattern = pattern.rstrip("/")
        if not pattern:
            continue
        anchored = "/" in pattern
        pattern = pattern.lstrip("/")
        prefix = f"{base}/" if base else ""
        body = glob_to_regex(pattern)
        regex = f"{re.escape(prefix)}{body}" if anchored else f"{re.escape(prefix)}(?:.*/)?{body}"
        rules.append(_IgnoreRule(re.compile(regex + r"\Z"), negated, dir_only))
    return rules


def _ignored(rules: list[_IgnoreRule], rel: str, *, is_dir: bool) -> bool:
    ignored = False
    for rule in rules:  # the last matching rule wins, as in git
        if (is_dir or not rule.dir_only) and rule.regex.match(rel):
            ignored = not rule.negated
    return ignored


@lru_cache(maxsize=256)
def glob_to_regex(pattern: str) -> str:
    """Translate a glob (`*`, `?`, `[...]`, `**`) to a regex over POSIX paths (no anchors)."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (end := pattern.find("]", i + 2)) != -1:
            body = pattern[i + 1:end].replace("\\", "\\\\")
            out.append("[^" + body[1:] + "]" if body.startswith("!") else "[" + body + "]")
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return "".join(out)


def glob_matcher(pattern: str) -> Callable[[str], bool]:
    """A test for relative paths: a pattern with `/` matches the whole path, one without the name."""
    pattern = pattern.strip().lstrip("/")
    regex = re.compile(glob_to_regex(pattern) + r"\Z")
    if "/" in pattern:
        return lambda path: regex.match(path) is not None
    return lambda path: regex.match(path.rsplit("/", 1)[-1]) is not None
