"""Real temporary repositories for the tool tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from glmcode.tools.base import ToolResult
from glmcode.tools.registry import get_tool, run_tool
from glmcode.tools.workspace import Workspace


def git(root: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=root, check=True, capture_output=True, text=True).stdout


def write(root: Path, name: str, content: str | bytes) -> Path:
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_bytes(content.encode())
    return path


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository with one commit: a small Python package and a .gitignore."""
    root = tmp_path / "repo"
    root.mkdir()
    git(root, "init", "-q", "-b", "main")
    git(root, "config", "user.name", "Test User")
    git(root, "config", "user.email", "test@example.com")
    write(root, ".gitignore", "build/\n*.log\n")
    write(root, "src/app.py", "def greet(name):\n    return f'hello {name}'\n")
    write(root, "README.md", "# demo\n")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "initial commit")
    return root


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """A directory that is not a git repository."""
    root = tmp_path / "plain"
    root.mkdir()
    write(root, "a.txt", "alpha\n")
    return root


def call(workspace: Workspace, name: str, **arguments) -> ToolResult:
    tool = get_tool(name)
    assert tool is not None, name
    return run_tool(tool, workspace, arguments)
