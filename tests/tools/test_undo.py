"""Checkpoints and undo on real repositories, driven through the real tools."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from glmcode.agent.undo import CHECKPOINT_REF, KEEP_DAYS, Checkpoints
from glmcode.tools.registry import get_tool, run_tool
from glmcode.tools.workspace import Workspace
from tests.tools.conftest import call, git, write


def run_checkpointed(checkpoints: Checkpoints, ws: Workspace, name: str, **arguments):
    """What the agent loop does: snapshot what the tool will touch, then run it."""
    tool = get_tool(name)
    checkpoints.snapshot(name, tool.touched_paths(ws, arguments))
    result = run_tool(tool, ws, arguments)
    assert not result.is_error, result.output
    return result


def user_git_state(root: Path) -> dict[str, str]:
    """Everything of the user's git state that checkpoints must never change."""
    return {
        "status": git(root, "status", "--porcelain=v1", "--untracked-files=all"),
        "staged": git(root, "diff", "--cached"),
        "head": git(root, "rev-parse", "HEAD"),
        "branches": git(root, "for-each-ref", "refs/heads", "refs/tags"),
        "stash": git(root, "stash", "list"),
    }


@pytest.fixture
def dirty_repo(repo: Path) -> Path:
    """A repository with a staged change, an unstaged change, an untracked and an executable file."""
    write(repo, "tool.sh", "#!/bin/sh\necho tool\n").chmod(0o755)
    write(repo, "win.txt", b"one\r\ntwo\r\n")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "more files")
    write(repo, "staged.py", "s = 1\n")
    git(repo, "add", "staged.py")
    write(repo, "README.md", "# demo\nuncommitted line\n")
    write(repo, "notes.txt", "untracked notes\n")
    return repo


def test_undo_an_edit(dirty_repo: Path) -> None:
    ws, checkpoints = Workspace(dirty_repo), Checkpoints(Workspace(dirty_repo))
    before = user_git_state(dirty_repo)
    index_before = (dirty_repo / ".git/index").read_bytes()
    call(ws, "read_file", path="win.txt")
    run_checkpointed(checkpoints, ws, "edit_file", path="win.txt", old_string="two", new_string="deux")
    assert (dirty_repo / "win.txt").read_bytes() == b"one\r\ndeux\r\n"
    assert checkpoints.can_undo
    assert checkpoints.undo() == ["win.txt"]
    assert (dirty_repo / "win.txt").read_bytes() == b"one\r\ntwo\r\n"
    assert (dirty_repo / ".git/index").read_bytes() == index_before
    assert user_git_state(dirty_repo) == before
    assert not checkpoints.can_undo and checkpoints.undo() == []


def test_undo_a_created_file_removes_it_and_its_new_directories(dirty_repo: Path) -> None:
    ws, checkpoints = Workspace(dirty_repo), Checkpoints(Workspace(dirty_repo))
    before = user_git_state(dirty_repo)
    run_checkpointed(checkpoints, ws, "write_file", path="pkg/deep/new.py", content="x = 1\n")
    assert checkpoints.undo() == ["pkg/deep/new.py"]
    assert not (dirty_repo / "pkg").exists()
    assert user_git_state(dirty_repo) == before


def test_undo_a_command_that_deleted_created_and_changed_files(dirty_repo: Path) -> None:
    ws, checkpoints = Workspace(dirty_repo), Checkpoints(Workspace(dirty_repo))
    before = user_git_state(dirty_repo)
    snapshot_bytes = {p: (dirty_repo / p).read_bytes() for p in ("tool.sh", "notes.txt", "README.md", "staged.py")}
    run_checkpointed(
        checkpoints, ws, "run_command",
        command="rm tool.sh notes.txt && echo changed >> README.md && echo new > made.txt && chmod +x staged.py "
                "&& mkdir -p build && echo junk > build/out.o",
    )
    changed = checkpoints.undo()
    assert changed == ["README.md", "made.txt", "notes.txt", "staged.py", "tool.sh"]
    for path, data in snapshot_bytes.items():
        assert (dirty_repo / path).read_bytes() == data
    assert stat.S_IMODE((dirty_repo / "tool.sh").stat().st_mode) & 0o111  # executable again
    assert not stat.S_IMODE((dirty_repo / "staged.py").stat().st_mode) & 0o111
    assert not (dirty_repo / "made.txt").exists()
    assert (dirty_repo / "build/out.o").exists()  # ignored files are not ours to undo
    assert user_git_state(dirty_repo) == before


def test_undo_steps_back_one_change_at_a_time(repo: Path) -> None:
    ws, checkpoints = Workspace(repo), Checkpoints(Workspace(repo))
    call(ws, "read_file", path="README.md")
    run_checkpointed(checkpoints, ws, "edit_file", path="README.md", old_string="demo", new_string="one")
    run_checkpointed(checkpoints, ws, "edit_file", path="README.md", old_string="one", new_string="two")
    assert checkpoints.undo() == ["README.md"]
    assert (repo / "README.md").read_text() == "# one\n"
    assert checkpoints.undo() == ["README.md"]
    assert (repo / "README.md").read_text() == "# demo\n"


def test_snapshots_live_on_a_private_ref(repo: Path) -> None:
    checkpoints = Checkpoints(Workspace(repo))
    first = checkpoints.snapshot("one", ["README.md"])
    second = checkpoints.snapshot("two")
    assert git(repo, "rev-parse", CHECKPOINT_REF).strip() == second
    assert git(repo, "rev-parse", f"{second}^").strip() == first
    assert git(repo, "log", "--format=%s", "-1", first).strip() == "one"
    assert "glmcode" not in git(repo, "branch", "--all") and git(repo, "stash", "list") == ""


def test_each_session_starts_a_new_chain_and_old_ones_are_collected(repo: Path) -> None:
    earlier = Checkpoints(Workspace(repo))
    old = [earlier.snapshot("old one"), earlier.snapshot("old two")]
    current = Checkpoints(Workspace(repo))
    first = current.snapshot("new", ["README.md"])
    assert git(repo, "rev-parse", CHECKPOINT_REF).strip() == first
    assert git(repo, "rev-list", "--count", CHECKPOINT_REF).strip() == "1"
    git(repo, "gc", "--quiet", "--prune=now")
    for commit in old:
        assert subprocess.run(["git", "cat-file", "-e", commit], cwd=repo).returncode != 0
    assert git(repo, "cat-file", "-t", first).strip() == "commit"


def test_diff_shows_everything_changed_since_the_first_snapshot(dirty_repo: Path) -> None:
    ws, checkpoints = Workspace(dirty_repo), Checkpoints(Workspace(dirty_repo))
    assert checkpoints.diff() == ""
    call(ws, "read_file", path="README.md")
    run_checkpointed(checkpoints, ws, "edit_file", path="README.md", old_string="uncommitted", new_string="edited")
    run_checkpointed(checkpoints, ws, "write_file", path="added.py", content="a = 1\n")
    run_checkpointed(checkpoints, ws, "run_command", command="rm notes.txt && chmod -x tool.sh")
    diff = checkpoints.diff()
    assert "--- a/README.md\n+++ b/README.md\n" in diff and "-uncommitted line\n+edited line\n" in diff
    assert "--- /dev/null\n+++ b/added.py\n@@ -0,0 +1 @@\n+a = 1\n" in diff
    assert "--- a/notes.txt\n+++ /dev/null\n" in diff
    assert "mode change 100755 -> 100644 tool.sh" in diff
    assert "staged.py" not in diff and "win.txt" not in diff


def test_checkpoints_outside_git_use_the_state_directory(plain: Path) -> None:
    tool = write(plain, "tool.sh", "#!/bin/sh\n")
    tool.chmod(0o750)
    ws, checkpoints = Workspace(plain), Checkpoints(Workspace(plain))
    run_checkpointed(checkpoints, ws, "run_command", command="rm tool.sh && echo b > b.txt && echo z >> a.txt")
    assert (plain / ".glmcode/checkpoints").is_dir()
    assert "+++ b/b.txt" in checkpoints.diff()
    assert checkpoints.undo() == ["a.txt", "b.txt", "tool.sh"]
    assert (plain / "a.txt").read_text() == "alpha\n" and not (plain / "b.txt").exists()
    assert tool.read_text() == "#!/bin/sh\n" and stat.S_IMODE(tool.stat().st_mode) == 0o750
    assert ".glmcode" not in call(ws, "list_files").output


def test_the_state_directory_forgets_snapshots_older_than_two_weeks(plain: Path) -> None:
    ws, earlier = Workspace(plain), Checkpoints(Workspace(plain))
    call(ws, "read_file", path="a.txt")
    run_checkpointed(earlier, ws, "write_file", path="a.txt", content="first change\n")
    run_checkpointed(earlier, ws, "write_file", path="a.txt", content="second change\n")
    store = plain / ".glmcode/checkpoints"
    records, blobs = sorted(store.glob("*.json")), set(store.glob("blobs/*"))
    assert len(records) == 2 and len(blobs) == 2
    two_weeks_ago = time.time() - KEEP_DAYS * 86400 - 60
    for path in [records[0], *blobs]:
        os.utime(path, (two_weeks_ago, two_weeks_ago))
    current = Checkpoints(Workspace(plain))
    assert sorted(store.glob("*.json")) == records[1:]
    # the blob of the kept snapshot stays, however old; the other one goes
    assert len(list(store.glob("blobs/*"))) == 1
    run_checkpointed(current, ws, "edit_file", path="a.txt", old_string="second", new_string="third")
    assert current.undo() == ["a.txt"] and (plain / "a.txt").read_text() == "second change\n"


def test_symlinks_and_binary_files_are_restored(repo: Path) -> None:
    write(repo, "image.bin", b"\x00\x01\x02binary")
    os.symlink("README.md", repo / "readme-link")
    ws, checkpoints = Workspace(repo), Checkpoints(Workspace(repo))
    run_checkpointed(checkpoints, ws, "run_command", command="rm readme-link && printf 'x\\0y' > image.bin")
    assert "Binary file image.bin changed" in checkpoints.diff()
    assert checkpoints.undo() == ["image.bin", "readme-link"]
    assert os.readlink(repo / "readme-link") == "README.md"
    assert (repo / "image.bin").read_bytes() == b"\x00\x01\x02binary"


def test_snapshot_bytes_are_exact_despite_git_filters(repo: Path) -> None:
    git(repo, "config", "core.autocrlf", "true")
    write(repo, ".gitattributes", "*.txt text eol=lf\n")
    write(repo, "dos.txt", b"a\r\nb\r\n")
    ws, checkpoints = Workspace(repo), Checkpoints(Workspace(repo))
    run_checkpointed(checkpoints, ws, "run_command", command="printf 'changed' > dos.txt")
    checkpoints.undo()
    assert (repo / "dos.txt").read_bytes() == b"a\r\nb\r\n"


def test_a_workspace_in_a_subdirectory_of_a_repo_keeps_git_status_clean(repo: Path) -> None:
    before = user_git_state(repo)
    ws = Workspace(repo / "src")
    checkpoints = Checkpoints(ws)
    run_checkpointed(checkpoints, ws, "run_command", command="echo extra >> app.py")
    assert checkpoints.undo() == ["app.py"]
    assert user_git_state(repo) == before


def test_undo_skips_snapshots_that_would_change_nothing(repo: Path) -> None:
    checkpoints = Checkpoints(Workspace(repo))
    checkpoints.snapshot("edit", ["README.md"])
    (repo / "README.md").write_text("# edited\n")
    checkpoints.snapshot("test run")  # a command that then changed nothing

    assert checkpoints.undo() == ["README.md"]
    assert (repo / "README.md").read_text() == "# demo\n"
    assert not checkpoints.can_undo
