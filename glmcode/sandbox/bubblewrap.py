"""bubblewrap (`bwrap`): the command in new namespaces, seeing a filesystem built for it.

The root is bound read-only; the repository is bound back writable (workspace-write) with its
`.git/` read-only over it; /tmp is a fresh tmpfs, through which the Python environments and PATH
directories that live under /tmp (a CI checkout's virtualenv, say) show read-only; each hidden
directory is covered by an empty tmpfs and each hidden file by /dev/null. `--unshare-all` gives new user, pid, network, ipc, uts
and cgroup namespaces (`--share-net` keeps the network when the policy allows it): the command
sees only a loopback interface, and when it exits the kernel kills everything left in its pid
namespace, however it detached. `--die-with-parent` ends the sandbox when glmcode goes.

Works unprivileged and as root where the kernel allows user namespaces; the probe runs a real
`bwrap ... true` once per process to find out.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

from glmcode.sandbox.policy import SandboxPolicy

NAME = "bubblewrap"


def unavailable(policy: SandboxPolicy) -> str | None:
    """None when bubblewrap can run a sandbox here, else why not."""
    return _probe()


@functools.lru_cache(maxsize=1)
def _probe() -> str | None:
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap is not installed"
    argv = [bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
            "--die-with-parent", "--", "/bin/sh", "-c", "true"]
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"bubblewrap does not start ({error})"
    if result.returncode != 0:
        reason = (result.stderr.strip().splitlines() or [f"exit code {result.returncode}"])[-1]
        return f"bubblewrap cannot create its namespaces here ({reason.removeprefix('bwrap: ')})"
    return None


def argv(policy: SandboxPolicy, command: str) -> list[str]:
    args = [shutil.which("bwrap") or "bwrap", "--die-with-parent", "--new-session", "--unshare-all"]
    if policy.network:
        args.append("--share-net")
    args += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for path in _toolchains_in_tmp(policy.root):
        args += ["--ro-bind", str(path), str(path)]
    root = str(policy.root)
    args += ["--bind" if policy.writable else "--ro-bind", root, root]  # after /tmp: the repo may be in it
    for path in policy.protected:
        args += ["--ro-bind", str(path), str(path)]
    for path in policy.hidden:
        if _under(path, _TMP) and not _under(path, policy.root):
            continue  # the private /tmp already hides it
        args += _hide(path)
    args += ["--setenv", "TMPDIR", "/tmp", "--chdir", root, "--", "/bin/sh", "-c", command]
    return args


_TMP = Path("/tmp")


def _under(path: Path, top: Path) -> bool:
    return path == top or top in path.parents


def _toolchains_in_tmp(root: Path) -> list[Path]:
    """What the private /tmp would hide but commands need: glmcode's own Python environment and
    the directories on PATH (a `bin/` entry counts as its parent, the virtualenv), under /tmp."""
    candidates = [Path(sys.prefix), Path(sys.base_prefix)]
    for entry in os.environ.get("PATH", "").split(os.pathsep):
        if entry:
            candidates.append(Path(entry).parent if Path(entry).name == "bin" else Path(entry))
    found: list[Path] = []
    for candidate in candidates:
        path = candidate.resolve()
        if path != _TMP and _under(path, _TMP) and not _under(path, root) and path.is_dir():
            if not any(_under(path, seen) for seen in found):
                found = [seen for seen in found if not _under(seen, path)] + [path]
    return found


def _hide(path: Path) -> list[str]:
    if path.is_dir():
        return ["--tmpfs", str(path), "--remount-ro", str(path)]
    return ["--ro-bind", "/dev/null", str(path)]
