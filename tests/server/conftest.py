"""`glmcode serve` as a real subprocess on 127.0.0.1, on tiny checkpoints, with HOME in a temp dir."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.cli.conftest import clean_env
from tests.conftest import ctrl_c_default, load_tiny_checkpoint_writer

START_SECONDS = 180  # loading a tiny model takes seconds; a busy CI machine may take longer
LISTENING = re.compile(r"listening on (http://\S+) ")


def slow_to_load_checkpoint(directory: Path, **config) -> Path:
    """A tiny checkpoint whose int4 load takes seconds (quantizing many experts), long enough to be
    asked while it loads; two layers keep its prefill cheap once it is ready."""
    return load_tiny_checkpoint_writer().make_tiny_checkpoint(
        directory, num_hidden_layers=2, n_routed_experts=128, hidden_size=128, moe_intermediate_size=128,
        intermediate_size=128, **config)  # fmt: skip


class Server:
    """One `glmcode serve` process. `lines` collects what it prints (stdout and stderr)."""

    def __init__(self, model: Path, home: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True):
        self.home = home
        self.env = clean_env(home, GLMCODE_CPU_KERNELS="0", **(env or {}))
        command = [sys.executable, "-m", "glmcode", "serve", "--model", str(model), "--device", "cpu", "--port", "0", *args]
        self.proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=self.env, preexec_fn=ctrl_c_default)  # fmt: skip
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.url = LISTENING.search(self.expect("listening on")).group(1)
        if wait:
            self.expect("ready:")

    @property
    def base_url(self) -> str:
        return f"{self.url}/v1"

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            self._new.put(line)
        self._new.put(None)

    def expect(self, text: str, timeout: float = START_SECONDS) -> str:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._new.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                pytest.fail(f"`glmcode serve` printed no {text!r} in {timeout}s:\n" + "\n".join(self.lines))
            if line is None:
                pytest.fail(f"`glmcode serve` ended before {text!r}:\n" + "\n".join(self.lines))
            if text in line:
                return line

    def health(self) -> tuple[int, dict]:
        response = httpx.get(f"{self.url}/health", timeout=10)
        return response.status_code, response.json()

    def wait_idle(self, timeout: float = 60) -> dict:
        """/health once nothing is in flight and every KV block is back in the pool."""
        deadline = time.monotonic() + timeout
        while True:
            status, health = self.health()
            if status == 200 and health["requests"]["in_flight"] == 0 and health["kv_cache"]["in_use"] == 0:
                return health
            if time.monotonic() > deadline:
                pytest.fail(f"the server did not come back to idle: {json.dumps(health)}")
            time.sleep(0.2)

    def stop(self, signum: int = signal.SIGINT, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            pytest.fail("`glmcode serve` did not stop:\n" + "\n".join(self.lines))

    def state_files(self) -> list[Path]:
        return sorted((self.home / ".local" / "state" / "glmcode" / "servers").glob("*.json"))


@pytest.fixture
def start_server(tmp_path):
    """start_server(model, *args, env=None, wait=True) -> Server; every one is stopped afterwards."""
    servers: list[Server] = []

    def start(model: Path, *args: str, env: dict[str, str] | None = None, wait: bool = True, home: Path | None = None) -> Server:
        directory = home or tmp_path / f"home{len(servers)}"
        directory.mkdir(exist_ok=True)
        servers.append(Server(model, directory, *args, env=env, wait=wait))
        return servers[-1]

    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """One shared server of the tiny random checkpoint, for tests that do not stop it."""
    running = Server(tiny_checkpoint, tmp_path_factory.mktemp("server-home"))
    yield running
    running.stop()


@pytest.fixture
def client(server):
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0, timeout=120)
