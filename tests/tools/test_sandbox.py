"""Every path resolves inside the repository; .git/ is never read or written by file tools."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from glmcode.errors import SandboxError
from glmcode.tools.workspace import Workspace, atomic_write
from tests.tools.conftest import call, write


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    secret = tmp_path / "secret.txt"
    secret.write_text("top secret\n")
    return secret


def test_relative_paths_resolve_inside_the_root(repo: Path) -> None:
    ws = Workspace(repo)
    assert ws.resolve("src/app.py") == repo.resolve() / "src/app.py"
    assert ws.resolve("src/../README.md") == repo.resolve() / "README.md"
    assert ws.resolve(str(repo / "README.md")) == repo.resolve() / "README.md"
    assert ws.resolve(".") == repo.resolve()


@pytest.mark.parametrize("tool,extra", [("read_file", {}), ("write_file", {"content": "x"})])
def test_dotdot_escape_is_refused(repo: Path, outside: Path, tool: str, extra: dict) -> None:
    result = call(Workspace(repo), tool, path="../secret.txt", **extra)
    assert result.is_error and "outside the repository" in result.output
    assert outside.read_text() == "top secret\n"


def test_absolute_path_outside_is_refused(repo: Path, outside: Path) -> None:
    ws = Workspace(repo)
    with pytest.raises(SandboxError):
        ws.resolve(str(outside))
    result = call(ws, "write_file", path=str(outside), content="owned")
    assert result.is_error and "outside the repository" in result.output
    assert outside.read_text() == "top secret\n"


def test_symlinks_that_escape_are_refused(repo: Path, outside: Path) -> None:
    os.symlink(outside, repo / "link.txt")
    os.symlink(outside.parent, repo / "linkdir")
    ws = Workspace(repo)
    for path in ("link.txt", "linkdir/secret.txt", "linkdir/new.txt"):
        with pytest.raises(SandboxError):
            ws.resolve(path)
    assert call(ws, "read_file", path="link.txt").is_error
    assert call(ws, "write_file", path="linkdir/new.txt", content="x").is_error
    assert not (outside.parent / "new.txt").exists()
    assert call(ws, "grep", pattern="secret", path="linkdir").is_error


def test_symlink_inside_the_repo_is_followed(repo: Path) -> None:
    os.symlink("src/app.py", repo / "alias.py")
    result = call(Workspace(repo), "read_file", path="alias.py")
    assert not result.is_error and "def greet" in result.output


@pytest.mark.parametrize("path", [".git/config", ".git/hooks/pre-commit", "src/../.git/HEAD"])
def test_git_directory_is_off_limits(repo: Path, path: str) -> None:
    ws = Workspace(repo)
    config_before = (repo / ".git/config").read_bytes()
    write_result = call(ws, "write_file", path=path, content="[core]\n")
    assert write_result.is_error and ".git/" in write_result.output
    assert call(ws, "read_file", path=path).is_error
    assert (repo / ".git/config").read_bytes() == config_before
    assert not (repo / ".git/hooks/pre-commit").exists()


def test_atomic_write_keeps_mode_and_leaves_no_temp_files(tmp_path: Path) -> None:
    target = write(tmp_path, "run.sh", "#!/bin/sh\n")
    target.chmod(0o750)
    atomic_write(target, b"#!/bin/sh\necho hi\n")
    assert target.read_bytes() == b"#!/bin/sh\necho hi\n"
    assert target.stat().st_mode & 0o777 == 0o750
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.sh"]
