"""What a hostile command tries, and how a test sees from outside whether it got anywhere.

Shared by the sandbox tests of the tools (tests/tools/test_os_sandbox.py) and of the whole
command (tests/e2e/test_hostile_commands.py).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

CANARY = "-----BEGIN OPENSSH PRIVATE KEY----- canary-3f9c1e"


@contextmanager
def fake_home() -> Iterator[Path]:
    """A home directory with a canary key in .ssh, outside /tmp (bubblewrap's private /tmp would
    hide anything under /tmp anyway, which would prove nothing about hiding credentials)."""
    base = "/var/tmp" if os.access("/var/tmp", os.W_OK) else None
    home = Path(tempfile.mkdtemp(prefix="glmcode-home-", dir=base))
    try:
        (home / ".ssh").mkdir(mode=0o700)
        (home / ".ssh" / "id_ed25519").write_text(CANARY + "\n")
        yield home
    finally:
        shutil.rmtree(home, ignore_errors=True)


class Listener:
    """A TCP server on 127.0.0.1 that records what each connection sends."""

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen()
        self._socket.settimeout(0.2)
        self.port = self._socket.getsockname()[1]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                connection, _ = self._socket.accept()
            except OSError:
                continue
            with connection:
                connection.settimeout(2)
                try:
                    self.received.append(connection.recv(100))
                except OSError:
                    self.received.append(b"")

    def got(self, token: str) -> bool:
        time.sleep(0.3)  # let the server thread record a connection that just happened
        return any(token.encode() in data for data in self.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


def connect_command(python: str, port: int, token: str) -> str:
    script = f"import socket; s = socket.create_connection(('127.0.0.1', {port}), timeout=5); s.sendall(b'{token}')"
    return f'{python} -c "{script}"'


def new_marker() -> str:
    """A sleep duration no other process uses, to find the process by its command line."""
    return f"{int(time.time()) % 1000 + 1000}.{uuid.uuid4().int % 10**6:06d}"


def detach_command(marker: str) -> str:
    """Start a child in a session of its own (out of the command's process group), give it a
    second to detach, then end: the child is meant to outlive the command."""
    return f"setsid sleep {marker} >/dev/null 2>&1 </dev/null & sleep 1; echo started"


def processes_with(marker: str) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/cmdline", "rb") as cmdline:
                    if f"sleep\0{marker}".encode() in cmdline.read():
                        found.append(int(name))
            except OSError:
                pass
    return found


def outlived(marker: str) -> bool:
    """Whether the detached child still runs (after a moment for a sandbox's teardown); kills it."""
    for _ in range(40):
        if not processes_with(marker):
            return False
        time.sleep(0.05)
    for pid in processes_with(marker):
        os.kill(pid, 9)
    return True
