"""git_status, git_diff and git_log on a real repository."""

from __future__ import annotations

import hashlib
from pathlib import Path

from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, git, write


def test_git_status_shows_branch_changes_and_untracked_files(repo: Path) -> None:
    write(repo, "src/app.py", "def greet(name):\n    return name\n")
    write(repo, "new/file.py", "x = 1\n")
    write(repo, "build/ignored.py", "x\n")
    lines = call(Workspace(repo), "git_status").output.splitlines()
    assert lines == ["## main", " M src/app.py", "?? new/file.py"]


def test_git_status_does_not_rewrite_the_users_index(repo: Path) -> None:
    write(repo, "src/app.py", "changed\n")
    index = repo / ".git/index"
    before = hashlib.sha256(index.read_bytes()).hexdigest(), index.stat().st_mtime_ns
    call(Workspace(repo), "git_status")
    call(Workspace(repo), "git_diff")
    assert (hashlib.sha256(index.read_bytes()).hexdigest(), index.stat().st_mtime_ns) == before


def test_git_diff_working_tree_staged_and_against_a_ref(repo: Path) -> None:
    ws = Workspace(repo)
    assert call(ws, "git_diff").output == "(no differences)"
    write(repo, "README.md", "# demo\nmore\n")
    unstaged = call(ws, "git_diff").output
    assert "diff --git a/README.md b/README.md" in unstaged and "+more" in unstaged
    assert call(ws, "git_diff", staged=True).output == "(no differences)"
    git(repo, "add", "README.md")
    assert "+more" in call(ws, "git_diff", staged=True).output
    git(repo, "commit", "-q", "-m", "more readme")
    assert "+more" in call(ws, "git_diff", ref="HEAD~1", path="README.md").output
    assert call(ws, "git_diff", ref="HEAD~1", path="src").output == "(no differences)"
    assert call(ws, "git_diff", ref="no-such-branch").is_error


def test_git_log_lists_commits_newest_first(repo: Path) -> None:
    write(repo, "README.md", "# demo 2\n")
    git(repo, "commit", "-q", "-am", "Update the readme")
    ws = Workspace(repo)
    lines = call(ws, "git_log").output.splitlines()
    assert len(lines) == 2
    assert lines[0].endswith("Test User: Update the readme") and lines[1].endswith("Test User: initial commit")
    assert len(call(ws, "git_log", max_count=1).output.splitlines()) == 1
    assert call(ws, "git_log", path="src").output.splitlines()[0].endswith("initial commit")


def test_git_tools_outside_a_repository_say_so(plain: Path) -> None:
    result = call(Workspace(plain), "git_status")
    assert result.is_error and "not a git repository" in result.output
