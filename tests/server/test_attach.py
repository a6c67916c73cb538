"""`chat`, `ask` and `fix` use a running `glmcode serve` of the same model, and say so."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from glmcode.console import validate_event
from glmcode.server.attach import attach
from glmcode.settings import Settings
from tests.cli.conftest import clean_env
from tests.conftest import load_tiny_checkpoint_writer
from tests.server.conftest import slow_to_load_checkpoint

# glmcode's own prompt (rules, tool specs) is longer than 4096 tokens of the tiny tokenizer.
ROOMY = {"max_position_embeddings": 16384}
SHORT_ANSWERS = {"GLMCODE_MAX_OUTPUT_TOKENS": "8", "GLMCODE_TEMPERATURE": "0", "GLMCODE_CPU_KERNELS": "0"}
USING = "using the model kept loaded by `glmcode serve` at"


@pytest.fixture(scope="module")
def roomy(tmp_path_factory) -> Path:
    return load_tiny_checkpoint_writer().make_tiny_checkpoint(tmp_path_factory.mktemp("roomy"), **ROOMY)


def ask(home: Path, model: Path, *args: str, env: dict | None = None) -> tuple[subprocess.CompletedProcess, list[dict]]:
    work = home / "work"
    work.mkdir(exist_ok=True)
    result = subprocess.run(
        [sys.executable, "-m", "glmcode", "ask", "hi", "--model", str(model), "--device", "cpu", "--max-turns", "1",
         "-o", "stream-json", *args],
        env=clean_env(home, **SHORT_ANSWERS, **(env or {})), cwd=work, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records and all(validate_event(record) == [] for record in records), result.stderr
    return result, records


def test_ask_uses_the_running_server_of_its_model_and_says_so_in_one_line(roomy, start_server, tmp_path):
    home = tmp_path / "home"
    server = start_server(roomy, home=home)
    result, records = ask(home, roomy)
    assert records[0]["backend"] == f"server:{server.base_url}"
    assert result.stderr.count(USING) == 1 and "--no-server" in result.stderr
    assert records[-1]["usage"]["prompt_tokens"] > 4096
    # The server's prefix cache serves the prompt every command shares.
    _, again = ask(home, roomy)
    assert again[-1]["usage"]["cached_tokens"] >= 4096
    server.wait_idle()


def test_no_server_another_model_or_a_stale_file_load_in_process(roomy, start_server, tmp_path, monkeypatch):
    home = tmp_path / "home"
    server = start_server(roomy, home=home)
    result, records = ask(home, roomy, "--no-server")
    assert records[0]["backend"] == "local" and USING not in result.stderr

    # The rest is attach()'s choice, asked in this process: a command it returns None to loads
    # in-process, which the `--no-server` run above and every local test already show.
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    notices: list[str] = []
    assert attach(Settings(model=str(roomy), device="cpu"), notices.append).label == f"server:{server.base_url}"
    other = load_tiny_checkpoint_writer().make_tiny_checkpoint(tmp_path / "other", seed=3, **ROOMY)
    assert attach(Settings(model=str(other), device="cpu"), notices.append) is None
    assert attach(Settings(model=str(roomy), quantization="int8", device="cpu"), notices.append) is None

    assert server.stop() == 0
    stale = home / ".local" / "state" / "glmcode" / "servers"
    dead = subprocess.Popen(["true"])
    dead.wait()
    (stale / f"{dead.pid}.json").write_text(json.dumps({
        "pid": dead.pid, "host": "127.0.0.1", "port": 9, "model_dir": str(roomy.resolve()), "quantization": None,
        "dtype": None, "device": "cpu", "served_model_name": "glm-4.7-flash", "api_key_required": False,
        "status": "ready", "max_context": 16384, "started": 0.0, "version": "0.1.0"}))  # fmt: skip
    assert attach(Settings(model=str(roomy), device="cpu"), notices.append) is None
    assert not list(stale.glob("*.json"))
    assert len(notices) == 1 and USING in notices[0]  # only the first, the server of this very model


def test_doctor_shows_the_running_server(roomy, start_server, tmp_path):
    home = tmp_path / "home"
    server = start_server(roomy, home=home)
    doctor = subprocess.run([sys.executable, "-m", "glmcode", "doctor", "--model", str(roomy)], env=clean_env(home),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    [line] = [line for line in doctor.stdout.splitlines() if "glmcode serve:" in line]
    assert server.base_url in line and "ready" in line and "chat, ask and fix use it" in line
    assert doctor.returncode == 0, doctor.stdout  # the server counts as a model to run


def test_a_server_that_wants_a_key_is_used_with_the_key_or_named(roomy, start_server, tmp_path):
    home = tmp_path / "home"
    server = start_server(roomy, home=home, env={"GLMCODE_SERVE_API_KEY": "sk-attach-test"})
    result, records = ask(home, roomy)
    assert result.returncode == 3 and "GLMCODE_SERVE_API_KEY" in result.stderr and "--no-server" in result.stderr
    result, records = ask(home, roomy, env={"GLMCODE_SERVE_API_KEY": "sk-attach-test"})
    assert records[0]["backend"] == f"server:{server.base_url}"


def test_a_server_still_loading_is_waited_for(tmp_path, start_server):
    slow = slow_to_load_checkpoint(tmp_path / "slow", **ROOMY)
    home = tmp_path / "home"
    server = start_server(slow, "--quantization", "int4", home=home, wait=False)
    result, records = ask(home, slow, "--quantization", "int4")
    assert "waiting for `glmcode serve`" in result.stderr and USING in result.stderr
    assert records[0]["backend"] == f"server:{server.base_url}"


def test_finding_and_using_a_server_imports_neither_torch_nor_the_web_stack():
    """An attached `ask` starts in a fraction of a second: it must not pay for the engine's imports."""
    check = "import sys, glmcode.server.attach, glmcode.doctor; print(sorted({'torch', 'fastapi', 'uvicorn'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
