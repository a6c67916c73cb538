"""grep over real files."""

from __future__ import annotations

from pathlib import Path

from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, write


def test_grep_prints_path_line_and_text(repo: Path) -> None:
    write(repo, "src/other.py", "import app\n\nprint(app.greet('x'))\n")
    output = call(Workspace(repo), "grep", pattern=r"greet\(").output.splitlines()
    assert output == ["src/app.py:1: def greet(name):", "src/other.py:3: print(app.greet('x'))"]


def test_grep_skips_ignored_and_binary_files(repo: Path) -> None:
    write(repo, "build/gen.py", "needle\n")
    write(repo, "trace.log", "needle\n")
    write(repo, "data.bin", b"needle\x00\x01")
    write(repo, "notes.txt", "a needle here\n")
    assert call(Workspace(repo), "grep", pattern="needle").output == "notes.txt:1: a needle here"


def test_grep_options_path_glob_and_case(repo: Path) -> None:
    write(repo, "src/a.py", "Token = 1\n")
    write(repo, "docs/a.md", "token\n")
    ws = Workspace(repo)
    assert call(ws, "grep", pattern="token", ignore_case=True, glob="*.py").output == "src/a.py:1: Token = 1"
    assert call(ws, "grep", pattern="token", path="docs").output == "docs/a.md:1: token"
    assert call(ws, "grep", pattern="token", path="docs/a.md").output == "docs/a.md:1: token"
    assert call(ws, "grep", pattern="absent_word").output == "No matches."


def test_grep_caps_results_and_says_so(repo: Path) -> None:
    write(repo, "many.txt", "hit\n" * 30)
    lines = call(Workspace(repo), "grep", pattern="hit", max_results=5).output.splitlines()
    assert lines[:5] == [f"many.txt:{i}: hit" for i in range(1, 6)]
    assert lines[5].startswith("[stopped at 5 matches")
    assert len(lines) == 6


def test_grep_reports_a_bad_regex(repo: Path) -> None:
    result = call(Workspace(repo), "grep", pattern="(unclosed")
    assert result.is_error and "invalid regular expression" in result.output
