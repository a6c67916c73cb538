"""The state files of running `glmcode serve` processes, which is how other commands find them.

A server writes `<state home>/servers/<pid>.json` (mode 0600, atomically) when it starts
listening, rewrites it when the model is ready, and removes it when it stops. A file whose
process is gone (a killed server) is stale: readers ignore and delete it. No file ever holds
the API key, only whether one is required.

A leaf module (no torch, no web stack): every command that looks for a server imports it.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from glmcode.settings import Settings, state_home

LOADING, READY = "loading", "ready"
API_KEY_VARIABLE = "GLMCODE_SERVE_API_KEY"  # the key a server requires and its local clients send


@dataclass
class ServerRecord:
    pid: int
    host: str
    port: int
    model_dir: str  # resolved
    quantization: str | None
    dtype: str | None
    device: str
    served_model_name: str
    api_key_required: bool
    status: str = LOADING
    max_context: int | None = None
    started: float = field(default_factory=time.time)
    version: str = ""

    @property
    def url(self) -> str:
        """Where to connect: a server bound to every address is reached on loopback."""
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(self.host, self.host)
        return f"http://[{host}]:{self.port}" if ":" in host else f"http://{host}:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def serves(self, settings: Settings) -> bool:
        """Whether this server runs the model these settings would load ("auto" device: any)."""
        return (
            self.model_dir == str(settings.model_dir().resolve())
            and self.quantization == settings.quantization
            and self.dtype == settings.dtype
            and settings.device in ("auto", self.device)
        )

    def describe(self) -> str:
        what = ", ".join(filter(None, [self.quantization, self.dtype, self.device]))
        up = _duration(time.time() - self.started)
        key = ", API key required" if self.api_key_required else ""
        return f"{self.base_url}  pid {self.pid}  {self.status}  {self.model_dir} ({what}){key}  up {up}"


def servers_dir() -> Path:
    return state_home() / "servers"


def write_record(record: ServerRecord) -> Path:
    directory = servers_dir()
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{record.pid}.json"
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=f".{record.pid}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as file:  # mkstemp makes it 0600
            json.dump(asdict(record), file)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def remove_record(pid: int) -> None:
    (servers_dir() / f"{pid}.json").unlink(missing_ok=True)


def running_servers() -> list[ServerRecord]:
    """Servers whose process is alive, oldest first; stale files are deleted."""
    records = []
    directory = servers_dir()
    if not directory.is_dir():
        return []
    for path in directory.glob("*.json"):
        try:
            record = ServerRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            continue  # half-written by hand, or of another version: not ours to judge
        if not _alive(record.pid):
            path.unlink(missing_ok=True)
            continue
        records.append(record)
    return sorted(records, key=lambda record: record.started)


def find_server(settings: Settings) -> ServerRecord | None:
    """The running server of the model these settings would load, ready ones first."""
    matching = [record for record in running_servers() if record.serves(settings)]
    matching.sort(key=lambda record: record.status != READY)
    return matching[0] if matching else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, someone else's
    return True


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"
