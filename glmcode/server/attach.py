"""Using a running `glmcode serve` instead of loading the model in this process.

`chat`, `ask` and `fix` without `--remote` look for a server of the same model (its state file,
server/state.py). One that is ready is used over HTTP, as `--remote URL` would; one still
loading is waited for (two copies of the model rarely fit one machine); one that does not answer
is ignored, and the model loads in-process as before. `--no-server` skips all of this.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

from glmcode.backends.remote import RemoteBackend, resolve_endpoint
from glmcode.errors import AuthError
from glmcode.server.state import API_KEY_VARIABLE, READY, ServerRecord, find_server
from glmcode.server.status import probe
from glmcode.settings import Settings

LOADING_WAIT_SECONDS = 1800  # the full model loads in minutes on a CPU; give up after half an hour
POLL_SECONDS = 1.0


class ServerBackend(RemoteBackend):
    """The model a local `glmcode serve` keeps loaded, spoken to over its OpenAI API."""

    def __init__(self, record: ServerRecord, api_key: str | None):
        endpoint = resolve_endpoint(record.base_url, env={}, api_key=api_key)
        super().__init__(endpoint, model=record.served_model_name, context_window=record.max_context)
        self.record = record

    @property
    def label(self) -> str:
        return f"server:{self.record.base_url}"


def attach(settings: Settings, notice: Callable[[str], None] | None = None) -> ServerBackend | None:
    """The running server of this model, ready to use, or None (load in-process)."""
    notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
    record = find_server(settings)
    if record is None:
        return None
    status = probe(record)
    if status == "loading":
        notice(f"glmcode: waiting for `glmcode serve` (pid {record.pid}) to finish loading the model…")
        deadline = time.monotonic() + LOADING_WAIT_SECONDS
        while status == "loading" and time.monotonic() < deadline:
            time.sleep(POLL_SECONDS)
            status = probe(record)
    if status != READY:
        return None
    record = find_server(settings) or record  # re-read: the ready record knows the context size
    api_key = None
    if record.api_key_required:
        api_key = os.environ.get(API_KEY_VARIABLE) or os.environ.get("GLMCODE_API_KEY")
        if not api_key:
            raise AuthError(f"`glmcode serve` at {record.base_url} runs this model but requires an API key: "
                            f"set {API_KEY_VARIABLE}, or pass --no-server to load the model here")  # fmt: skip
    notice(f"glmcode: using the model kept loaded by `glmcode serve` at {record.base_url} (pid {record.pid}); "
           "--no-server loads it here instead")  # fmt: skip
    return ServerBackend(record, api_key)
