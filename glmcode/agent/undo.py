"""Checkpoints of the working tree before each change, and undo.

Before a mutating tool runs, the files it will touch (or, for a command, the whole working tree:
tracked plus untracked, non-ignored files) are recorded as a snapshot: path -> (mode, content).
In a git repository snapshots are commits on the private ref `refs/glmcode/checkpoints`, built
with git plumbing and a temporary index file, so the user's index, stash, HEAD and branches are
never touched; elsewhere they live in `.glmcode/checkpoints/`. Undo puts the files covered by the
last snapshot back exactly: content, mode, and existence (files created since are removed).

Undo only reaches the snapshots of its own session, so old ones are let go: each session starts
a new chain of commits on the ref (git gc collects the unreachable old chains once they are older
than its prune expiry), and the directory store deletes snapshots older than KEEP_DAYS.
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from glmcode.errors import GlmcodeError, SandboxError
from glmcode.tools.listing import STATE_DIR
from glmcode.tools.textfile import decode, is_binary, unified_diff
from glmcode.tools.workspace import Workspace, atomic_write, default_permissions

CHECKPOINT_REF = "refs/glmcode/checkpoints"
MAX_SNAPSHOT_FILE_BYTES = 50_000_000  # bigger files are neither recorded nor restored
KEEP_DAYS = 14  # the directory store's snapshots live this long (another session may be using them)

State = dict[str, tuple[str, str]]  # repo-relative path -> (mode, blob id)


@dataclass(frozen=True)
class _Snapshot:
    id: str
    label: str
    paths: tuple[str, ...] | None  # None: the whole working tree


class _ObjectStore(Protocol):
    def mode_of(self, status: os.stat_result) -> str: ...
    def put(self, paths: list[Path]) -> list[str]: ...
    def get(self, blob: str) -> bytes: ...
    def save(self, label: str, state: State) -> str: ...
    def load(self, snapshot_id: str) -> State: ...
    def permissions(self, mode: str, current: Path) -> int: ...


class Checkpoints:
    def __init__(self, workspace: Workspace):
        self.workspace = workspace
        self._store: _ObjectStore = _GitStore(workspace.root) if workspace.is_git else _DirStore(workspace.root)
        self._stack: list[_Snapshot] = []
        self._hashes: dict[str, tuple[tuple[int, ...], str]] = {}  # path -> (stat key, blob id)

    @property
    def can_undo(self) -> bool:
        return bool(self._stack)

    def snapshot(self, label: str, paths: list[str | Path] | None = None) -> str:
        """Record the given files (None: the whole working tree) before a change; returns its id."""
        covered = None if paths is None else tuple(sorted(self._covered(paths)))
        snapshot_id = self._store.save(label, self._state(covered))
        self._stack.append(_Snapshot(snapshot_id, label, covered))
        return snapshot_id

    def undo(self) -> list[str]:
        """Restore the files of the last snapshot as they were; returns the paths that changed."""
        # Snapshots taken before a tool that changed nothing (a test run, say) restore nothing:
        # skip them, so one undo always undoes a real change.
        changed: set[str] = set()
        while self._stack and not changed:
            snapshot = self._stack.pop()
            before = self._store.load(snapshot.id)
            changed = self._changed(snapshot, before)
        for path in sorted(changed, key=lambda p: before.get(p) is not None):  # removals first
            self._restore(path, before.get(path))
        return sorted(changed)

    def diff(self) -> str:
        """A unified diff of what changed since this session's first snapshot."""
        baseline: dict[str, State] = {}  # path -> the earliest snapshot's state that covers it
        seen: set[str] = set()
        for snapshot in self._stack:
            state = self._store.load(snapshot.id)
            changed = self._changed(snapshot, state)
            covered = changed if snapshot.paths is None else snapshot.paths
            for path in covered:
                if path not in seen and path in changed:
                    baseline[path] = state
                seen.add(path)
            if snapshot.paths is None:
                break  # a whole-tree snapshot covers everything after it
        return "".join(self._file_diff(path, baseline[path].get(path)) for path in sorted(baseline))

    # -- states ------------------------------------------------------------------------------

    def _covered(self, paths: list[str | Path]) -> set[str]:
        covered = set()
        for path in paths:
            try:
                resolved = self.workspace.resolve(path)
            except SandboxError:
                continue  # the tool itself will refuse it; nothing of ours to record
            if resolved.is_dir():
                covered.update(self.workspace.files(under=resolved))
            elif resolved != self.workspace.root:
                covered.add(self.workspace.relative(resolved))
        return covered

    def _state(self, paths: tuple[str, ...] | None) -> State:
        """The current (mode, blob) of `paths` that exist (None: every file of the working tree)."""
        names = self.workspace.files() if paths is None else paths
        state: State = {}
        unhashed: list[tuple[str, tuple[int, ...], str]] = []
        for name in names:
            if name.split("/")[0] == STATE_DIR:
                continue
            try:
                status = (self.workspace.root / name).lstat()
            except OSError:
                continue
            if not (stat.S_ISREG(status.st_mode) or stat.S_ISLNK(status.st_mode)):
                continue
            if status.st_size > MAX_SNAPSHOT_FILE_BYTES:
                continue
            mode = self._store.mode_of(status)
            key = (status.st_mtime_ns, status.st_size, status.st_ino, status.st_mode)
            cached = self._hashes.get(name)
            if cached is not None and cached[0] == key:
                state[name] = (mode, cached[1])
            else:
                unhashed.append((name, key, mode))
        blobs = self._store.put([self.workspace.root / name for name, _, _ in unhashed])
        for (name, key, mode), blob in zip(unhashed, blobs, strict=True):
            self._hashes[name] = (key, blob)
            state[name] = (mode, blob)
        return state

    def _changed(self, snapshot: _Snapshot, before: State) -> set[str]:
        now = self._state(snapshot.paths)
        return {path for path in before.keys() | now.keys() if before.get(path) != now.get(path)}

    # -- restoring ---------------------------------------------------------------------------

    def _restore(self, path: str, entry: tuple[str, str] | None) -> None:
        parent = self.workspace.resolve(Path(path).parent)  # refuses a parent swapped for an escaping link
        target = parent / Path(path).name
        if entry is None:
            if target.is_symlink() or target.is_file():
                target.unlink()
                self._prune_empty_dirs(target.parent)
            return
        mode, blob = entry
        data = self._store.get(blob)
        if target.is_symlink() or (mode == "120000" and target.exists()):
            target.unlink()
        if mode == "120000":
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(os.fsdecode(data), target)
        else:
            atomic_write(target, data, self._store.permissions(mode, target))

    def _prune_empty_dirs(self, directory: Path) -> None:
        while directory != self.workspace.root and not any(directory.iterdir()):
            directory.rmdir()
            directory = directory.parent

    def _file_diff(self, path: str, before: tuple[str, str] | None) -> str:
        after_path = self.workspace.root / path
        after = None
        if after_path.is_symlink():
            after = ("120000", os.readlink(after_path))
        elif after_path.is_file():
            after = (self._store.mode_of(after_path.lstat()), after_path.read_bytes())
        old = None if before is None else (before[0], self._store.get(before[1]))
        header = ""
        if old and after and old[0] != after[0]:
            header = f"mode change {old[0]} -> {after[0]} {path}\n"
        texts = [_as_text(side) for side in (old, after)]
        if any(text is _BINARY for text in texts):
            return header + f"Binary file {path} changed\n"
        return header + unified_diff(texts[0], texts[1], path)


_BINARY = "\0binary"


def _as_text(side: tuple[str, bytes | str] | None) -> str | None:
    if side is None:
        return None
    mode, content = side
    if mode == "120000":
        return f"symlink -> {os.fsdecode(content)}\n"
    assert isinstance(content, bytes)
    return _BINARY if is_binary(content) else decode(content).text


# -- storage ------------------------------------------------------------------------------------


class _GitStore:
    """Blobs in the repository's object database; snapshots as commits on CHECKPOINT_REF."""

    _IDENTITY = {
        "GIT_AUTHOR_NAME": "glmcode", "GIT_AUTHOR_EMAIL": "glmcode@localhost",
        "GIT_COMMITTER_NAME": "glmcode", "GIT_COMMITTER_EMAIL": "glmcode@localhost",
    }

    def __init__(self, root: Path):
        self.root = root
        self._last: str | None = None  # this session's newest snapshot: the parent of the next

    def _git(self, *args: str, stdin: bytes = b"", env: dict[str, str] | None = None) -> bytes:
        done = subprocess.run(
            ["git", *args], cwd=self.root, input=stdin, capture_output=True,
            env={**os.environ, "GIT_OPTIONAL_LOCKS": "0", **self._IDENTITY, **(env or {})},
        )
        if done.returncode != 0:
            raise GlmcodeError(f"checkpoint: git {args[0]} failed: {done.stderr.decode(errors='replace').strip()}")
        return done.stdout

    def mode_of(self, status: os.stat_result) -> str:
        if stat.S_ISLNK(status.st_mode):
            return "120000"
        return "100755" if status.st_mode & 0o100 else "100644"

    def put(self, paths: list[Path]) -> list[str]:
        """Store the files' exact bytes (no filters: no CRLF conversion, no LFS) and return their ids."""
        blobs: dict[Path, str] = {}
        regular = [p for p in paths if not p.is_symlink()]
        if regular:
            listing = "".join(f"{p}\n" for p in regular).encode("utf-8", "surrogateescape")
            ids = self._git("hash-object", "-w", "--no-filters", "--stdin-paths", stdin=listing).split()
            blobs.update(zip(regular, (i.decode() for i in ids), strict=True))
        for link in (p for p in paths if p.is_symlink()):
            target = os.fsencode(os.readlink(link))
            blobs[link] = self._git("hash-object", "-w", "--stdin", stdin=target).decode().strip()
        return [blobs[p] for p in paths]

    def get(self, blob: str) -> bytes:
        return self._git("cat-file", "blob", blob)

    def save(self, label: str, state: State) -> str:
        with tempfile.TemporaryDirectory(prefix="glmcode-index-") as scratch:
            env = {"GIT_INDEX_FILE": str(Path(scratch) / "index")}
            entries = "".join(f"{mode} {blob}\t{path}\0" for path, (mode, blob) in state.items())
            self._git("update-index", "-z", "--index-info", stdin=entries.encode("utf-8", "surrogateescape"), env=env)
            tree = self._git("write-tree", env=env).decode().strip()
        parents = ["-p", self._last] if self._last else []
        commit_id = self._git("commit-tree", tree, *parents, "-m", label or "checkpoint").decode().strip()
        self._git("update-ref", CHECKPOINT_REF, commit_id)
        self._last = commit_id
        return commit_id

    def load(self, snapshot_id: str) -> State:
        state: State = {}
        for record in self._git("ls-tree", "-r", "-z", snapshot_id).split(b"\0"):
            if record:
                meta, path = record.split(b"\t", 1)
                mode, _kind, blob = meta.decode().split()
                state[path.decode("utf-8", "surrogateescape")] = (mode, blob)
        return state

    def permissions(self, mode: str, current: Path) -> int:
        """Git keeps only the executable bit: change just that on an existing file."""
        executable = mode == "100755"
        if current.is_file():
            bits = current.stat().st_mode & 0o7777
            if executable == bool(bits & 0o100):
                return bits
            return bits | ((bits & 0o444) >> 2) if executable else bits & ~0o111
        return default_permissions(executable)


class _DirStore:
    """Content-addressed blobs and JSON snapshots under .glmcode/checkpoints/, for non-git directories."""

    def __init__(self, root: Path):
        self.base = root / STATE_DIR / "checkpoints"
        self.blobs = self.base / "blobs"
        self._prune()

    def _prune(self) -> None:
        """Delete snapshots older than KEEP_DAYS, then the blobs no snapshot left refers to."""
        if not self.base.is_dir():
            return
        cutoff = time.time() - KEEP_DAYS * 86400
        kept: set[str] = set()
        try:
            for record in self.base.glob("*.json"):
                if record.stat().st_mtime < cutoff:
                    record.unlink(missing_ok=True)
                else:
                    kept.update(blob for _mode, blob in self.load(record.stem).values())
            for blob in self.blobs.glob("*"):  # a save in progress has touched its blobs (see put)
                if blob.name not in kept and blob.stat().st_mtime < cutoff:
                    blob.unlink(missing_ok=True)
        except (OSError, ValueError, KeyError):  # a record we cannot read: keep every blob
            return

    def mode_of(self, status: os.stat_result) -> str:
        return "120000" if stat.S_ISLNK(status.st_mode) else f"{status.st_mode:o}"

    def put(self, paths: list[Path]) -> list[str]:
        ids = []
        for path in paths:
            data = os.fsencode(os.readlink(path)) if path.is_symlink() else path.read_bytes()
            blob = hashlib.sha256(data).hexdigest()
            try:
                os.utime(self.blobs / blob)  # stored already: fresh again, so pruning keeps it
            except FileNotFoundError:
                atomic_write(self.blobs / blob, data, 0o600)
            ids.append(blob)
        return ids

    def get(self, blob: str) -> bytes:
        return (self.blobs / blob).read_bytes()

    def save(self, label: str, state: State) -> str:
        self.base.mkdir(parents=True, exist_ok=True)
        ignore_all = self.base.parent / ".gitignore"  # the root may sit inside someone's git repo
        if not ignore_all.exists():
            atomic_write(ignore_all, b"*\n")
        number = 1 + max((int(p.stem) for p in self.base.glob("*.json")), default=0)
        record = {"label": label, "state": state}
        atomic_write(self.base / f"{number:06d}.json", json.dumps(record).encode(), 0o600)
        return f"{number:06d}"

    def load(self, snapshot_id: str) -> State:
        record = json.loads((self.base / f"{snapshot_id}.json").read_text())
        return {path: (mode, blob) for path, (mode, blob) in record["state"].items()}

    def permissions(self, mode: str, current: Path) -> int:
        return int(mode, 8) & 0o7777
