"""read_file, write_file, edit_file, list_files and glob on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from glmcode.tools.files import MAX_READ_LINES
from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, write

# -- read_file ----------------------------------------------------------------------------------


def test_read_file_numbers_lines_and_reads_ranges(repo: Path) -> None:
    write(repo, "lines.txt", "".join(f"line {i}\n" for i in range(1, 11)))
    ws = Workspace(repo)
    whole = call(ws, "read_file", path="lines.txt").output
    assert whole.splitlines()[0] == "     1\tline 1"
    assert whole.splitlines()[-1] == "    10\tline 10"
    part = call(ws, "read_file", path="lines.txt", start_line=3, end_line="4").output.splitlines()
    assert part == ["     3\tline 3", "     4\tline 4", "[lines 3-4 of 10]"]
    assert "past the end" in call(ws, "read_file", path="lines.txt", start_line=50).output


def test_read_file_caps_long_files_and_says_how_to_continue(repo: Path) -> None:
    write(repo, "big.txt", "".join(f"{i}\n" for i in range(1, MAX_READ_LINES + 501)))
    result = call(Workspace(repo), "read_file", path="big.txt")
    lines = result.output.splitlines()
    assert len(lines) == MAX_READ_LINES + 1
    total, next_line = MAX_READ_LINES + 500, MAX_READ_LINES + 1
    assert lines[-1] == f"[lines 1-{MAX_READ_LINES} of {total}; read more with start_line={next_line}]"


def test_read_file_refuses_binary_missing_and_directories(repo: Path) -> None:
    write(repo, "blob.bin", b"\x89PNG\r\n\x1a\n\x00\x00\x00IHDR")
    ws = Workspace(repo)
    binary = call(ws, "read_file", path="blob.bin")
    assert binary.is_error and "binary" in binary.output
    assert "no such file" in call(ws, "read_file", path="nope.py").output
    assert "list_files" in call(ws, "read_file", path="src").output


# -- write_file ---------------------------------------------------------------------------------


def test_write_file_creates_files_and_directories(repo: Path) -> None:
    result = call(Workspace(repo), "write_file", path="pkg/sub/mod.py", content="x = 1\ny = 2\n")
    assert not result.is_error and "Created pkg/sub/mod.py (2 lines)" in result.output
    assert (repo / "pkg/sub/mod.py").read_text() == "x = 1\ny = 2\n"


def test_write_file_over_an_existing_file_needs_a_read_first(repo: Path) -> None:
    ws = Workspace(repo)
    refused = call(ws, "write_file", path="README.md", content="gone\n")
    assert refused.is_error and "read the file" in refused.output
    assert (repo / "README.md").read_text() == "# demo\n"
    call(ws, "read_file", path="README.md")
    assert not call(ws, "write_file", path="README.md", content="# new\n").is_error
    assert (repo / "README.md").read_text() == "# new\n"


def test_write_file_keeps_crlf_bom_and_mode(repo: Path) -> None:
    path = write(repo, "win.txt", b"\xef\xbb\xbfone\r\ntwo\r\n")
    path.chmod(0o755)
    ws = Workspace(repo)
    call(ws, "read_file", path="win.txt")
    assert not call(ws, "write_file", path="win.txt", content="uno\ndos\ntres\n").is_error
    assert path.read_bytes() == b"\xef\xbb\xbfuno\r\ndos\r\ntres\r\n"
    assert path.stat().st_mode & 0o777 == 0o755


# -- edit_file ----------------------------------------------------------------------------------


def _edit(ws: Workspace, path: str, old: str, new: str, **extra):
    call(ws, "read_file", path=path)
    return call(ws, "edit_file", path=path, old_string=old, new_string=new, **extra)


def test_edit_file_exact_replacement_returns_the_diff(repo: Path) -> None:
    ws = Workspace(repo)
    result = _edit(ws, "src/app.py", "f'hello {name}'", "f'hi {name}!'")
    assert not result.is_error
    assert "1 replacement starting at line 2" in result.output
    assert "-    return f'hello {name}'" in result.output and "+    return f'hi {name}!'" in result.output
    assert (repo / "src/app.py").read_text() == "def greet(name):\n    return f'hi {name}!'\n"


def test_edit_file_refuses_ambiguous_matches_with_line_numbers(repo: Path) -> None:
    write(repo, "dup.py", "x = 1\ny = 2\nx = 1\n")
    ws = Workspace(repo)
    result = _edit(ws, "dup.py", "x = 1", "x = 3")
    assert result.is_error and "2 places" in result.output and "lines 1, 3" in result.output
    assert (repo / "dup.py").read_text() == "x = 1\ny = 2\nx = 1\n"
    assert not call(ws, "edit_file", path="dup.py", old_string="x = 1", new_string="x = 3", replace_all=True).is_error
    assert (repo / "dup.py").read_text() == "x = 3\ny = 2\nx = 3\n"


def test_edit_file_tolerates_trailing_whitespace(repo: Path) -> None:
    write(repo, "ws.py", "a = 1   \nb = 2\n")
    result = _edit(Workspace(repo), "ws.py", "a = 1\nb = 2", "a = 10\nb = 20")
    assert not result.is_error and "ignoring trailing whitespace" in result.output
    assert (repo / "ws.py").read_text() == "a = 10\nb = 20\n"


def test_edit_file_reindents_a_replacement_matched_ignoring_indentation(repo: Path) -> None:
    source = (
        "class Shop:\n    def total(self):\n        if self.items:\n            return sum(self.items)\n"
        "        return 0\n"
    )
    write(repo, "shop.py", source)
    old = "if self.items:\n    return sum(self.items)\n"
    new = "if not self.items:\n    return 0\nreturn sum(self.items)\n"
    result = _edit(Workspace(repo), "shop.py", old, new)
    assert not result.is_error and "ignoring indentation" in result.output
    assert (repo / "shop.py").read_text() == (
        "class Shop:\n    def total(self):\n        if not self.items:\n            return 0\n"
        "        return sum(self.items)\n        return 0\n"
    )


def test_edit_file_strips_pasted_line_numbers(repo: Path) -> None:
    ws = Workspace(repo)
    result = _edit(ws, "src/app.py", "     2\t    return f'hello {name}'", "     2\t    return name")
    assert not result.is_error
    assert (repo / "src/app.py").read_text() == "def greet(name):\n    return name\n"


def test_edit_file_no_match_shows_the_closest_lines(repo: Path) -> None:
    write(repo, "calc.py", "def add(a, b):\n    return a + b\n\n\ndef sub(a, b):\n    return a - b\n")
    result = _edit(Workspace(repo), "calc.py", "def sub(a, c):\n    return a - c", "pass")
    assert result.is_error and "not found" in result.output
    assert "     5\tdef sub(a, b):" in result.output and "     6\t    return a - b" in result.output


def test_edit_file_hints_when_the_edit_is_already_applied(repo: Path) -> None:
    result = _edit(Workspace(repo), "src/app.py", "return 'bye'", "return f'hello {name}'")
    assert result.is_error and "already in the file at line 2" in result.output


def test_edit_file_requires_a_read_and_no_change_since(repo: Path) -> None:
    ws = Workspace(repo)
    unread = call(ws, "edit_file", path="src/app.py", old_string="greet", new_string="welcome")
    assert unread.is_error and "read the file" in unread.output
    call(ws, "read_file", path="src/app.py")
    (repo / "src/app.py").write_text("def greet(name):\n    return name.upper()\n")  # the user edits it
    stale = call(ws, "edit_file", path="src/app.py", old_string="greet", new_string="welcome")
    assert stale.is_error and "changed since you last read it" in stale.output
    assert "greet" in (repo / "src/app.py").read_text()
    call(ws, "read_file", path="src/app.py")
    assert not call(ws, "edit_file", path="src/app.py", old_string="greet", new_string="welcome").is_error


def test_edits_chain_without_rereading_the_agents_own_writes(repo: Path) -> None:
    ws = Workspace(repo)
    assert not _edit(ws, "src/app.py", "greet", "welcome").is_error
    assert not call(ws, "edit_file", path="src/app.py", old_string="hello", new_string="hey").is_error
    assert (repo / "src/app.py").read_text() == "def welcome(name):\n    return f'hey {name}'\n"


def test_edit_file_keeps_crlf_bom_latin1_and_mode(repo: Path) -> None:
    crlf = write(repo, "crlf.py", b"\xef\xbb\xbfa = 1\r\nb = 2\r\n")
    crlf.chmod(0o754)
    latin = write(repo, "latin.txt", "caf\xe9 = 1\nthé\n".encode("latin-1"))
    ws = Workspace(repo)
    assert not _edit(ws, "crlf.py", "a = 1\nb = 2", "a = 1\nb = 3\nc = 4").is_error
    assert crlf.read_bytes() == b"\xef\xbb\xbfa = 1\r\nb = 3\r\nc = 4\r\n"
    assert crlf.stat().st_mode & 0o777 == 0o754
    assert not _edit(ws, "latin.txt", "caf\xe9 = 1", "caf\xe9 = 2").is_error
    assert latin.read_bytes() == "caf\xe9 = 2\nthé\n".encode("latin-1")
    refused = call(ws, "edit_file", path="latin.txt", old_string="thé", new_string="茶")
    assert refused.is_error and "latin-1" in refused.output


def test_edit_preview_is_the_diff_and_touched_paths_the_file(repo: Path) -> None:
    from glmcode.tools.registry import get_tool

    ws = Workspace(repo)
    call(ws, "read_file", path="src/app.py")
    tool = get_tool("edit_file")
    arguments = {"path": "src/app.py", "old_string": "hello", "new_string": "hi"}
    preview = tool.preview(ws, arguments)
    assert preview.startswith("--- a/src/app.py\n+++ b/src/app.py\n")
    assert "+    return f'hi {name}'" in preview
    assert tool.touched_paths(ws, arguments) == [repo.resolve() / "src/app.py"]
    assert (repo / "src/app.py").read_text().count("hello") == 1  # a preview changes nothing
    assert get_tool("read_file").preview(ws, {"path": "x"}) is None


# -- list_files / glob --------------------------------------------------------------------------


def _populate(root: Path) -> None:
    write(root, "build/out.py", "generated\n")
    write(root, "debug.log", "noise\n")
    write(root, "src/pkg/core.py", "x = 1\n")
    write(root, "src/pkg/util.py", "y = 2\n")
    write(root, "docs/index.md", "# docs\n")


def test_list_files_honours_gitignore_in_a_git_repo(repo: Path) -> None:
    _populate(repo)
    output = call(Workspace(repo), "list_files").output.splitlines()
    assert output == [".gitignore", "README.md", "docs/index.md", "src/app.py", "src/pkg/core.py", "src/pkg/util.py"]


def test_list_files_honours_gitignore_without_git(plain: Path) -> None:
    write(plain, ".gitignore", "build/\n*.log\n/docs/\n!keep.log\n")
    _populate(plain)
    write(plain, "keep.log", "kept\n")
    write(plain, "src/.gitignore", "util.py\n")
    write(plain, ".git/config", "[core]\n")
    output = call(Workspace(plain), "list_files").output.splitlines()
    assert output == [".gitignore", "a.txt", "keep.log", "src/.gitignore", "src/pkg/core.py"]


@pytest.mark.parametrize("kind", ["repo", "plain"])
def test_installed_dependencies_are_not_listed_even_when_not_ignored(kind: str, request) -> None:
    root = request.getfixturevalue(kind)
    write(root, "src/app.py", "x = 1\n")
    write(root, "venv/pyvenv.cfg", "home = /usr/bin\n")
    write(root, "venv/lib/python3.11/site-packages/big/__init__.py", "y = 2\n")
    write(root, "web/node_modules/left-pad/index.js", "module.exports = 1\n")
    write(root, "web/app.js", "1\n")
    listed = call(Workspace(root), "list_files").output.splitlines()
    assert "src/app.py" in listed and "web/app.js" in listed
    assert not [f for f in listed if f.startswith("venv/") or "node_modules" in f], listed


def test_list_files_depth_summarizes_deeper_directories(repo: Path) -> None:
    _populate(repo)
    ws = Workspace(repo)
    assert call(ws, "list_files", depth=1).output.splitlines() == [
        ".gitignore", "README.md", "docs/ (1 files)", "src/ (3 files)"
    ]
    assert call(ws, "list_files", path="src", depth=1).output.splitlines() == ["src/app.py", "src/pkg/ (2 files)"]


def test_glob_matches_names_anywhere_or_paths_relative_to_path(repo: Path) -> None:
    _populate(repo)
    ws = Workspace(repo)
    assert call(ws, "glob", pattern="*.py").output.splitlines() == ["src/app.py", "src/pkg/core.py", "src/pkg/util.py"]
    assert call(ws, "glob", pattern="src/**/c*.py").output.splitlines() == ["src/pkg/core.py"]
    assert call(ws, "glob", pattern="**/*.md", path="docs").output.splitlines() == ["docs/index.md"]
    assert call(ws, "glob", pattern="*.rs").output == "(no files)"
    os.remove(repo / "src/app.py")  # tracked but deleted: not listed
    assert "src/app.py" not in call(ws, "glob", pattern="*.py").output


def test_a_workspace_in_a_repo_subdirectory_uses_the_repos_ignore_rules(repo: Path) -> None:
    write(repo, "src/debug.log", "ignored by the root .gitignore\n")
    write(repo, "src/extra.py", "x = 1\n")
    assert call(Workspace(repo / "src"), "list_files").output.splitlines() == ["app.py", "extra.py"]
