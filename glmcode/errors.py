"""The one family of errors a user can cause, each with its exit code.

Anything raised from this family reaches the user as a single line (no traceback) and the
process exits with `exit_code`. Messages say what went wrong and what to do next.
"""


class GlmcodeError(Exception):
    """Base class: a problem the user can fix. Exit code 1."""

    exit_code = 1


class UsageError(GlmcodeError):
    """Bad flags, bad arguments, bad configuration values."""

    exit_code = 2


class BackendUnavailable(GlmcodeError):
    """The model cannot be reached or loaded: no weights, bad checkpoint, auth, dead server."""

    exit_code = 3


class CheckpointError(BackendUnavailable):
    """A model directory that is missing, incomplete, corrupted or of an unsupported kind."""


class AuthError(BackendUnavailable):
    """A remote API key that is missing, wrong or not valid for this endpoint."""


class ServerError(BackendUnavailable):
    """A remote server that is unreachable, times out, or keeps failing after retries."""


class LimitReached(GlmcodeError):
    """A configured limit stopped the run: turns, tokens, wall time, loop guard."""

    exit_code = 4


class ContextOverflow(LimitReached):
    """A request that does not fit the context window or the KV cache pool."""


class SandboxError(GlmcodeError):
    """A path that resolves outside the repository, or a write into .git/."""


class Interrupted(GlmcodeError):
    """The user pressed Ctrl-C."""

    exit_code = 130
