"""What a sandboxed command may touch: the mode, the writable repository, hidden paths, network.

- `read-only`: the whole filesystem is read-only, the repository included; a private /tmp.
- `workspace-write`: read-only except the repository (its `.git/` stays read-only: a hook
  written there would later run outside any sandbox) and a private /tmp.
- `off`: no sandbox, the user's full rights (an explicit choice).

In both sandboxed modes credentials are hidden (what a command prints goes back to the model,
and with `--remote` off the machine) and the network is cut unless the policy allows it.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from glmcode.options import SANDBOX_MODES, SANDBOX_WORKSPACE_WRITE

# Under the home directory: keys, tokens and credential stores of the common tools.
HIDDEN_IN_HOME = (
    ".ssh", ".aws", ".gnupg", ".netrc", ".git-credentials", ".config/gh", ".docker", ".kube",
    ".config/gcloud", ".azure", ".npmrc", ".pypirc",
)


@dataclass(frozen=True)
class SandboxPolicy:
    mode: str
    root: Path  # the repository, resolved
    network: bool = False
    hidden: tuple[Path, ...] = ()  # resolved paths that exist; the sandbox makes them unreadable

    @property
    def writable(self) -> bool:
        return self.mode == SANDBOX_WORKSPACE_WRITE

    @property
    def protected(self) -> tuple[Path, ...]:
        """Paths inside the writable repository that stay read-only."""
        git = self.root / ".git"
        return (git,) if self.writable and git.exists() else ()


def make_policy(
    mode: str,
    root: Path,
    *,
    network: bool = False,
    home: Path,
    own_dirs: Iterable[Path] = (),
    extra_hidden: Iterable[str | Path] = (),
) -> SandboxPolicy:
    """The policy for `mode` in the repository `root`.

    Hidden: HIDDEN_IN_HOME under `home`, glmcode's own config and data directories (`own_dirs`:
    the config file may hold an API key, sessions and history what the user typed), and
    `extra_hidden` (the `sandbox_hidden` setting; `~` is the home directory, a relative path is
    relative to it). Only paths that exist are kept, resolved through symlinks; a path that
    holds the repository is left visible, since the repository must be.
    """
    if mode not in SANDBOX_MODES:
        raise ValueError(f"unknown sandbox mode {mode!r}")
    root = root.resolve()
    candidates = [home / name for name in HIDDEN_IN_HOME] + list(own_dirs)
    for entry in extra_hidden:
        text = str(entry)
        path = home / text[2:] if text == "~" or text.startswith("~/") else Path(text)
        candidates.append(path if path.is_absolute() else home / path)
    hidden: list[Path] = []
    for candidate in candidates:
        if not os.path.lexists(candidate):
            continue
        resolved = candidate.resolve()
        if resolved == root or resolved in root.parents or resolved in hidden:
            continue
        hidden.append(resolved)
    return SandboxPolicy(mode, root, network, tuple(hidden))
