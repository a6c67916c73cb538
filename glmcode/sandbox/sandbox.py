"""Choosing a mechanism for a policy, launching commands through it, explaining a denial.

A `Sandbox` is what the shell tools hold: `argv(command)` is the process to start for a shell
command line, `stop(process)` ends it with everything it started, and `blocked_hint(output)` is
the one line added to a failed command's output when its error looks like the sandbox's doing.
A sandbox whose policy no mechanism can enforce here is `unavailable` (the reason, one line):
commands are then refused, never run unconfined behind the user's back.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from glmcode.options import SANDBOX_OFF
from glmcode.sandbox import bubblewrap, landlock, seatbelt
from glmcode.sandbox.policy import SandboxPolicy

# Each mechanism module has NAME, unavailable(policy) -> reason | None, argv(policy, command),
# and optionally stop(process).
Mechanism = ModuleType

_DENIALS = (
    "Read-only file system", "Permission denied", "Operation not permitted", "Network is unreachable",
    "Connection refused", "Temporary failure in name resolution", "Name or service not known",
    "Could not resolve host", "No address associated with hostname", "nodename nor servname",
)


def mechanisms_for(platform: str = sys.platform) -> tuple[Mechanism, ...]:
    """The mechanisms to try on this platform, best first."""
    if platform.startswith("linux"):
        return (bubblewrap, landlock)
    if platform == "darwin":
        return (seatbelt,)
    return ()


@dataclass(frozen=True)
class Sandbox:
    policy: SandboxPolicy | None  # None: off
    mechanism: Mechanism | None = None
    unavailable: str | None = None  # why commands are refused

    @property
    def name(self) -> str:
        """`workspace-write (bubblewrap)`, `off`, or the mode when it cannot be enforced."""
        if self.policy is None:
            return SANDBOX_OFF
        return f"{self.policy.mode} ({self.mechanism.NAME})" if self.mechanism else self.policy.mode

    def argv(self, command: str) -> list[str]:
        if self.unavailable is not None:
            raise RuntimeError(self.unavailable)  # callers check `unavailable` first
        if self.policy is None or self.mechanism is None:
            return ["/bin/sh", "-c", command]
        return self.mechanism.argv(self.policy, command)

    def stop(self, process: Any) -> None:
        """Before the process group is killed: let the mechanism end the whole tree first."""
        stop = getattr(self.mechanism, "stop", None)
        if stop is not None:
            stop(process)

    def blocked_hint(self, output: str) -> str | None:
        """One line for a failed command whose error may be the sandbox's doing, else None."""
        policy = self.policy
        if policy is None or not (any(d in output for d in _DENIALS) or any(str(p) in output for p in policy.hidden)):
            return None
        blocked = ["writes outside the repository (and to .git/)" if policy.writable else "all writes"]
        blocked.append("reading credential files")
        if not policy.network:
            blocked.append("the network")
        listed = ", ".join(blocked[:-1]) + " and " + blocked[-1]
        options = "--sandbox-network or --sandbox off" if not policy.network else "--sandbox off"
        return (f"[the {policy.mode} sandbox blocks {listed}: the error above may come from it; if the command "
                f"needs that, the user can rerun glmcode with {options}]")


def open_sandbox(policy: SandboxPolicy, mechanisms: Sequence[Mechanism] | None = None) -> Sandbox:
    """The first mechanism that can enforce `policy` here; a refusing Sandbox if none can."""
    if policy.mode == SANDBOX_OFF:
        return Sandbox(None)
    reasons = []
    for mechanism in mechanisms_for() if mechanisms is None else mechanisms:
        reason = mechanism.unavailable(policy)
        if reason is None:
            return Sandbox(policy, mechanism)
        reasons.append(reason)
    return Sandbox(policy, unavailable=(
        f"no sandbox can enforce --sandbox {policy.mode} here ({'; '.join(reasons) or no_mechanism()}): "
        f"{install_advice() + ' or ' if install_advice() else ''}pass --sandbox off to run commands without one"
    ))


def no_mechanism() -> str:
    return f"glmcode has no sandbox for {sys.platform}"


def install_advice() -> str:
    return "install bubblewrap (apt install bubblewrap)" if sys.platform.startswith("linux") else ""
