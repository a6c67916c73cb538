"""Starting, finding and stopping `glmcode serve`: state files, Ctrl-C and SIGTERM, bad addresses."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys

import httpx
import pytest

from tests.cli.conftest import clean_env

openai = pytest.importorskip("openai")

MODEL = "glm-4.7-flash"
LONG = [{"role": "system", "content": "You are a careful reviewer. " * 120}, {"role": "user", "content": "Review."}]


def glmcode(home, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "glmcode", *args], capture_output=True, text=True, timeout=timeout,
                          env=clean_env(home))  # fmt: skip


def _stop_mid_stream(server, messages: list[dict], signum: int) -> None:
    """Stop `server` with `signum` while it streams an answer to `messages`: the stream ends with
    an error and [DONE], the process exits 0 and removes its state file."""
    body = {"model": MODEL, "messages": messages, "max_tokens": 3000, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data:"))
        server.proc.send_signal(signum)
        rest = [line for line in lines if line.startswith("data:")]
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in json.loads(rest[-2].removeprefix("data: "))["error"]["message"]
    assert server.proc.wait(60) == 0
    assert any("stopped" in line for line in server.lines)
    assert server.state_files() == []


def test_a_stop_signal_ends_streams_cleanly_flushes_the_disk_tier_and_exits_0(tiny_checkpoint, start_server, tmp_path):
    cache = tmp_path / "kv"
    first = start_server(tiny_checkpoint, "--kv-cache-dir", str(cache))
    _stop_mid_stream(first, LONG, signal.SIGINT)
    flushed = set(cache.rglob("*.kv"))
    assert len(flushed) >= 2  # the prompt's full blocks

    # The next server reads them back: its first answer of the same prompt is mostly cached.
    again = start_server(tiny_checkpoint, "--kv-cache-dir", str(cache))
    client = openai.OpenAI(base_url=again.base_url, api_key="unused", max_retries=0)
    answer = client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=2)
    assert answer.usage.prompt_tokens_details.cached_tokens >= 512

    # SIGTERM (what systemd and docker send) flushes a new prompt's blocks the same way.
    other = [{"role": "system", "content": "You are a terse tester. " * 120}, {"role": "user", "content": "Test."}]
    _stop_mid_stream(again, other, signal.SIGTERM)
    assert len(set(cache.rglob("*.kv")) - flushed) >= 2


def test_serve_status_lists_the_running_server_and_ignores_a_stale_file(tiny_checkpoint, start_server, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    none = glmcode(home, "serve", "--status")
    assert none.returncode == 3 and "no glmcode server is running" in none.stdout
    server = start_server(tiny_checkpoint, home=home)
    [state] = server.state_files()
    record = json.loads(state.read_text())
    assert record["status"] == "ready" and record["port"] == int(server.url.rsplit(":", 1)[1])
    dead = subprocess.Popen(["true"])  # a pid that no longer runs, like a killed server's
    dead.wait()
    stale = state.with_name(f"{dead.pid}.json")
    stale.write_text(json.dumps(record | {"pid": dead.pid, "port": 9}))
    listed = glmcode(home, "serve", "--status")
    assert listed.returncode == 0 and listed.stdout.count("\n") == 1, listed.stdout
    assert server.base_url in listed.stdout and "ready" in listed.stdout
    assert not stale.exists()


def test_binding_beyond_loopback_needs_a_key(tiny_checkpoint, tmp_path):
    result = glmcode(tmp_path, "serve", "--model", str(tiny_checkpoint), "--host", "0.0.0.0", "--port", "0")
    assert result.returncode == 2 and "--api-key" in result.stderr and "Traceback" not in result.stderr


def test_a_busy_port_is_one_line(tiny_checkpoint, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = glmcode(tmp_path, "serve", "--model", str(tiny_checkpoint), "--port", str(port))
    assert result.returncode == 1 and f"port {port}" in result.stderr and "in use" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
