"""Runs one stdio MCP server and takes everything it started down with it.

    python reaper.py COMMAND [ARGS...]

The MCP SDK starts this script in a new process group (its stdin and stdout are the server's,
inherited as they are), and stops it by closing stdin, then with SIGTERM and SIGKILL to the
group. That covers the server itself, but a server that exits cleanly leaves whatever it
spawned running, and nothing stops the group if glmcode itself is killed. So this script:

- starts the server as its child and waits for it;
- when the server exits, or SIGTERM/SIGHUP arrives, ends the whole group (SIGTERM, then
  SIGKILL after a grace period);
- on Linux asks the kernel for SIGTERM when its parent (glmcode's MCP thread) dies, so even a
  glmcode killed with SIGKILL leaves no server behind.

Standard library only, and run as a file, so it starts fast.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time

_GRACE = 1.0
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        sys.exit(1)


def _end_group() -> None:
    """SIGTERM to everyone else in our group, a grace period, then SIGKILL to what is left
    (us included: we are done by then)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    group = os.getpgrp()
    if group != os.getpid():  # not started as a group leader: the group is not ours to end
        return
    os.killpg(group, signal.SIGTERM)
    deadline = time.monotonic() + _GRACE
    while _others_alive(group):
        if time.monotonic() > deadline:
            os.killpg(group, signal.SIGKILL)
        time.sleep(0.02)


def _others_alive(group: int) -> bool:
    """Whether any process but us is left in the group (Linux /proc; elsewhere assume yes)."""
    if not os.path.isdir("/proc/self"):
        return True
    own = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == own:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == group and fields[0] != b"Z":
            return True
    return False


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: reaper.py COMMAND [ARGS...]", file=sys.stderr)
        return 2
    _die_with_parent()
    try:
        server = subprocess.Popen(argv)
    except OSError as error:
        print(f"cannot start {argv[0]}: {error.strerror}", file=sys.stderr)
        return 127

    def stop(signum: int, frame: object) -> None:
        _end_group()
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is glmcode's to handle
    code = server.wait()
    _end_group()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
