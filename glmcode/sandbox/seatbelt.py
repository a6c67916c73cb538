"""macOS: `sandbox-exec` with a Seatbelt profile written for the policy.

Written against Apple's SBPL profile language as Codex CLI and Chromium use it, and NOT tested
here (glmcode is developed and tested on Linux); treat it as a first version. The profile
allows by default and then denies: every write outside the repository, the per-user temporary
directory and a few devices; writes to `.git/`; reads of the hidden paths; IP networking unless
the policy allows it. Unlike the Linux mechanisms there is no pid namespace or subreaper: a
process that detaches from the command's process group outlives it.
"""

from __future__ import annotations

import os
import shutil
import sys

from glmcode.sandbox.policy import SandboxPolicy

NAME = "seatbelt"
_SANDBOX_EXEC = "/usr/bin/sandbox-exec"
_WRITABLE_DEVICES = ("/dev/null", "/dev/zero", "/dev/tty", "/dev/dtracehelper", "/dev/stdout", "/dev/stderr")


def unavailable(policy: SandboxPolicy) -> str | None:
    if sys.platform != "darwin":
        return "sandbox-exec is macOS only"
    if not os.access(_SANDBOX_EXEC, os.X_OK) and shutil.which("sandbox-exec") is None:
        return "sandbox-exec is missing"
    return None


def argv(policy: SandboxPolicy, command: str) -> list[str]:
    return [_SANDBOX_EXEC, "-p", profile(policy), "/bin/sh", "-c", command]


def profile(policy: SandboxPolicy) -> str:
    temp = os.path.realpath(os.environ.get("TMPDIR") or "/tmp")
    writable = [f'(subpath "{_quote(temp)}")', '(subpath "/private/tmp")', '(subpath "/private/var/folders")']
    writable += [f'(literal "{device}")' for device in _WRITABLE_DEVICES]
    if policy.writable:
        writable.append(f'(subpath "{_quote(str(policy.root))}")')
    lines = [
        "(version 1)",
        "(allow default)",
        f"(deny file-write* (require-not (require-any {' '.join(writable)})))",
    ]
    lines += [f'(deny file-write* (subpath "{_quote(str(path))}"))' for path in policy.protected]
    for path in policy.hidden:
        kind = "subpath" if path.is_dir() else "literal"
        lines.append(f'(deny file-read* ({kind} "{_quote(str(path))}"))')
    if not policy.network:
        lines += [
            '(deny network-outbound (remote ip "*:*"))',
            '(deny network-inbound (local ip "*:*"))',
            '(deny network-bind (local ip "*:*"))',
        ]
    return "\n".join(lines) + "\n"


def _quote(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
