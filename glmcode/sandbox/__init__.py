"""OS sandboxes for the commands the agent runs (run_command, run_tests, `fix`'s verification).

- policy.py: what a command may touch, per mode (read-only, workspace-write, off: the names
  are in glmcode.options).
- bubblewrap.py: Linux, the first choice: namespaces and a filesystem built for the command.
- landlock.py: Linux, the fallback where bubblewrap is missing or user namespaces are blocked.
- seatbelt.py: macOS sandbox-exec (written, not tested here).
- sandbox.py: choosing the mechanism, launching through it, the hint for a blocked command.

The file tools keep their own confinement (glmcode.tools.workspace); this is for processes.
"""

from glmcode.sandbox.policy import SandboxPolicy, make_policy
from glmcode.sandbox.sandbox import Sandbox, mechanisms_for, open_sandbox

UNCONFINED = Sandbox(None)

__all__ = ["UNCONFINED", "Sandbox", "SandboxPolicy", "make_policy", "mechanisms_for", "open_sandbox"]
