"""Landlock: the kernel's own access control, for where bubblewrap is missing or user
namespaces are blocked (containers, hardened kernels).

The command starts under a small supervisor (landlock_supervisor.py, run as `python -m`):

- the supervisor makes a private temporary directory (the command's TMPDIR) and becomes a child
  subreaper, so whatever the command leaves behind, even a process that detached with setsid,
  becomes its child; when the command exits (or the supervisor gets SIGTERM), it kills them all;
- the child restricts itself with a Landlock ruleset, then execs the shell: reading is allowed
  everywhere but the hidden paths, writing only in the repository (workspace-write; `.git/`
  excepted) and the private directory, TCP connect and bind nowhere unless the network is
  allowed, and no signals or abstract UNIX sockets beyond its own domain.

Landlock only grants, it cannot deny beneath a grant, so "everything but X" is granted entry by
entry around X: in workspace-write, the repository's existing top-level entries other than
`.git/` are writable, and new top-level entries cannot be created. What older kernels cannot
do: UDP is restricted from ABI 10 on, connecting to path-named UNIX sockets from ABI 9 on.
The binding is `landlockpy`.
"""

from __future__ import annotations

import json
import signal
import sys

from glmcode.sandbox.policy import SandboxPolicy

NAME = "landlock"
_NETWORK_ABI = 4  # TCP bind/connect rules


def abi_version() -> int:
    try:
        import landlockpy
    except ImportError:
        return -1
    return landlockpy.abi_version()


def unavailable(policy: SandboxPolicy) -> str | None:
    if not sys.platform.startswith("linux"):
        return "Landlock is Linux only"
    abi = abi_version()
    if abi < 0:
        return "the Landlock binding (landlockpy) is not installed"
    if abi == 0:
        return "the kernel has no Landlock (Linux 5.13+ with landlock in its LSM list)"
    if not policy.network and abi < _NETWORK_ABI:
        return f"this kernel's Landlock (ABI {abi}) cannot cut the network (ABI {_NETWORK_ABI}, Linux 6.7+)"
    return None


def argv(policy: SandboxPolicy, command: str) -> list[str]:
    description = {
        "root": str(policy.root), "writable": policy.writable, "network": policy.network,
        "hidden": [str(path) for path in policy.hidden], "protected": [str(path) for path in policy.protected],
    }
    return [sys.executable, "-m", "glmcode.sandbox.landlock_supervisor", json.dumps(description), "/bin/sh", "-c", command]


def stop(process) -> None:
    """Ask the supervisor to kill the command's whole tree; it exits once that is done."""
    try:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=5)
    except Exception:  # noqa: BLE001 - the caller kills the process group next either way
        pass
