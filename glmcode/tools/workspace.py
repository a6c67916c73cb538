"""The repository the tools work in: the sandbox, read tracking and atomic writes.

Every path a tool receives goes through `Workspace.resolve`, which follows symlinks and refuses
anything that lands outside the repository root or inside `.git/`. Edits are only allowed on
files read in this workspace and unchanged since (`record_read` / `check_unchanged`), so the
model never overwrites work it has not seen.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

from glmcode.errors import SandboxError
from glmcode.sandbox import UNCONFINED, Sandbox
from glmcode.tools.listing import list_repo_files


class ToolError(Exception):
    """A tool call that cannot be carried out; its message goes back to the model as the result."""


class Workspace:
    def __init__(self, root: str | Path, *, test_command: str | None = None, command_timeout: float = 120.0,
                 sandbox: Sandbox = UNCONFINED):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise SandboxError(f"{root}: not a directory")
        self.test_command = test_command
        self.command_timeout = command_timeout
        self.sandbox = sandbox  # the OS sandbox the shell tools run commands in
        toplevel = _git_toplevel(self.root)
        self.is_git = toplevel == self.root  # the root of a git work tree (where checkpoints use git)
        self._in_git = toplevel is not None  # anywhere inside one (where git lists the files)
        self._reads: dict[Path, str] = {}  # path -> sha256 of the bytes the model last saw

    # -- the sandbox -------------------------------------------------------------------------

    def resolve(self, path: str | Path) -> Path:
        """The absolute, symlink-free path for `path` (relative to the root), or SandboxError."""
        text = str(path).strip()
        if not text or "\0" in text:
            raise SandboxError(f"{text!r}: not a valid path")
        candidate = Path(text)
        if not candidate.is_absolute():
            candidate = self.root / candidate
        resolved = candidate.resolve()
        if resolved != self.root and self.root not in resolved.parents:
            raise SandboxError(f"{text}: outside the repository ({self.root}); only paths inside it are allowed")
        if self.relative(resolved).split("/")[0] == ".git":
            raise SandboxError(f"{text}: inside .git/, which file tools never touch; use the git_* tools")
        return resolved

    def relative(self, path: Path) -> str:
        """`path` (absolute, inside the root) as a repo-relative POSIX string; "." for the root."""
        return path.relative_to(self.root).as_posix() or "."

    def files(self, under: Path | None = None) -> list[str]:
        """Repo-relative paths of the files under `under` (default: the root), honouring .gitignore."""
        prefix = "" if under is None or under == self.root else self.relative(under) + "/"
        return [f for f in list_repo_files(self.root, self._in_git) if f.startswith(prefix)]

    # -- read-before-edit --------------------------------------------------------------------

    def record_read(self, path: Path, data: bytes) -> None:
        self._reads[path] = hashlib.sha256(data).hexdigest()

    def check_unchanged(self, path: Path, data: bytes) -> None:
        """Refuse to modify a file the model has not read, or one that changed since it did."""
        seen = self._reads.get(path)
        shown = self.relative(path)
        if seen is None:
            raise ToolError(f"{shown}: read the file with read_file before changing it")
        if seen != hashlib.sha256(data).hexdigest():
            raise ToolError(f"{shown}: the file changed since you last read it; read it again before changing it")


def atomic_write(path: Path, data: bytes, mode: int | None = None) -> None:
    """Write `data` via a temp file in the same directory and a rename.

    `mode` gives the permission bits; by default an existing file keeps its own and a new one
    gets the umask's default.
    """
    if mode is None:
        mode = path.stat().st_mode & 0o7777 if path.exists() else default_permissions()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def default_permissions(executable: bool = False) -> int:
    """The permission bits a new file gets under the process's umask."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if executable else 0o666) & ~umask


def _git_toplevel(directory: Path) -> Path | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"], cwd=directory, capture_output=True, text=True, check=False
        )
    except FileNotFoundError:
        return None
    return Path(done.stdout.strip()).resolve() if done.returncode == 0 else None
