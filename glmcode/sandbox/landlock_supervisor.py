"""The Landlock supervisor: `python -m glmcode.sandbox.landlock_supervisor POLICY_JSON ARGV...`.

It becomes a child subreaper and makes the command's private TMPDIR, then forks: the child
restricts itself with the ruleset below and execs ARGV; the supervisor waits, kills whatever
the command left behind (orphans are reparented to it, however they detached), removes the
directory and exits with the command's exit code. SIGTERM makes it kill the tree and exit.
See landlock.py for the policy it enforces. Kept apart so that the package does not import it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/ptmx",
            "/dev/pts", "/dev/shm")


def _restrict(policy: dict, private_tmp: str) -> None:
    from landlockpy import AccessFS, AccessNet, Ruleset, Scope, abi_version, fs_for_abi, net_for_abi

    abi = abi_version()
    everything = fs_for_abi(abi)
    read = AccessFS.EXECUTE | AccessFS.READ_FILE | AccessFS.READ_DIR
    write = everything & ~AccessFS.RESOLVE_UNIX
    network = AccessNet.NONE if policy["network"] else net_for_abi(abi)
    with Ruleset(handled_fs=everything, handled_net=network,
                 scoped=Scope.ABSTRACT_UNIX_SOCKET | Scope.SIGNAL) as ruleset:
        hidden = [Path(path) for path in policy["hidden"]]
        _grant_around(ruleset, Path("/"), hidden, read, AccessFS.READ_DIR)
        if policy["writable"]:
            protected = [Path(path) for path in policy["protected"]]
            _grant_around(ruleset, Path(policy["root"]), protected + hidden, write, AccessFS.NONE)
        for device in _DEVICES:
            if os.path.exists(device):
                _grant(ruleset, Path(device), write)
        _grant(ruleset, Path(private_tmp), write)
        ruleset.restrict()


def _grant_around(ruleset, top: Path, excluded: list[Path], access, on_ancestors) -> None:
    """Grant `access` on the hierarchy at `top` except the excluded paths beneath it: their
    ancestors get only `on_ancestors`, every other entry along the way the full grant."""
    inside = [path for path in excluded if path == top or top in path.parents]
    if not inside:
        _grant(ruleset, top, access)
        return
    if top in inside:
        return
    _grant(ruleset, top, on_ancestors)
    try:
        entries = list(os.scandir(top))
    except OSError:
        return
    for entry in entries:
        if not entry.is_symlink():  # a link is checked where it points
            _grant_around(ruleset, Path(entry.path), inside, access, on_ancestors)


def _grant(ruleset, path: Path, access) -> None:
    from landlockpy import AccessFS

    if not path.is_dir():
        access &= AccessFS.EXECUTE | AccessFS.WRITE_FILE | AccessFS.READ_FILE | AccessFS.TRUNCATE | AccessFS.IOCTL_DEV
    if access:
        try:
            ruleset.allow_path(path, access)
        except OSError:
            pass  # vanished, or a file system Landlock cannot tag: it stays denied


def _children(parent: int) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat", "rb") as stat:
                    fields = stat.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == parent:
                found.append(int(name))
    return found


def _kill_descendants() -> None:
    """Kill every process that is (or, orphaned, became) our child, until none is left."""
    me = os.getpid()
    while True:
        for pid in _children(me):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _supervise(policy: dict, command: list[str]) -> int:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    private_tmp = tempfile.mkdtemp(prefix="glmcode-sandbox-")
    try:
        child = os.fork()
        if child == 0:
            try:
                _restrict(policy, private_tmp)
                os.chdir(policy["root"])
                os.execve(command[0], command, {**os.environ, "TMPDIR": private_tmp})
            except BaseException as error:  # noqa: BLE001 - nothing must run unconfined
                os.write(2, f"glmcode sandbox: cannot confine the command: {error}\n".encode())
            os._exit(126)

        def terminate(signum, frame):
            _kill_descendants()
            raise SystemExit(128 + signum)

        signal.signal(signal.SIGTERM, terminate)
        _, status = os.waitpid(child, 0)
        _kill_descendants()
        code = os.waitstatus_to_exitcode(status)
        return code if code >= 0 else 128 - code  # killed by a signal: as a shell reports it
    finally:
        shutil.rmtree(private_tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(_supervise(json.loads(sys.argv[1]), sys.argv[2:]))
