"""Run the real `glmcode` command in a subprocess, with HOME and the XDG dirs in a temp dir."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
_SCRUBBED_PREFIXES = ("GLMCODE_", "XDG_", "HF_")
# Keys and colour switches would change what the tests see.
_SCRUBBED = {"ZHIPUAI_API_KEY", "ZAI_API_KEY", "NO_COLOR", "FORCE_COLOR", "COLUMNS"}


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(_SCRUBBED_PREFIXES) and k not in _SCRUBBED}
    env.update(
        HOME=str(home),
        XDG_CONFIG_HOME=str(home / "config"),
        XDG_DATA_HOME=str(home / "data"),
        PYTHONPATH=str(REPO_ROOT),
        HF_HUB_OFFLINE="1",
        TERM="xterm-256color",
    )
    env.update(extra)
    return env


class Cli:
    """`cli("ask", "hi", input="...")` runs `python -m glmcode ask hi` and returns the CompletedProcess."""

    def __init__(self, home: Path, cwd: Path) -> None:
        self.home = home
        self.cwd = cwd

    def __call__(self, *args: str, input: str = "", env: dict[str, str] | None = None,
                 cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "glmcode", *args],
            input=input, capture_output=True, text=True, timeout=timeout,
            cwd=cwd or self.cwd, env=clean_env(self.home, **(env or {})), check=False,
        )


@pytest.fixture
def home(tmp_path: Path) -> Path:
    path = tmp_path / "home"
    path.mkdir()
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


BUGGY = "def add(a, b):\n    return a - b\n"
TESTS = "from calc import add\n\n\ndef test_add():\n    assert add(2, 3) == 5\n"


@pytest.fixture
def repo(workdir: Path) -> Path:
    """A git repository with a bug (add subtracts) and a test that catches it."""
    (workdir / "calc.py").write_text(BUGGY)
    (workdir / "test_calc.py").write_text(TESTS)
    for command in (["git", "init", "-q"], ["git", "add", "-A"],
                    ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "init"]):
        subprocess.run(command, cwd=workdir, check=True)
    return workdir


@pytest.fixture
def cli(home: Path, workdir: Path) -> Cli:
    return Cli(home, workdir)


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """User errors are one line on stderr, never a traceback."""
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


def write_checkpoint(directory: Path) -> Path:
    """A tiny but complete checkpoint directory in the Hugging Face layout (not a working model)."""
    import numpy
    from safetensors.numpy import save_file

    directory.mkdir(parents=True)
    config = {"model_type": "glm4_moe_lite", "architectures": ["Glm4MoeLiteForCausalLM"], "hidden_size": 64,
              "num_hidden_layers": 2, "n_routed_experts": 4, "num_experts_per_tok": 2, "vocab_size": 128,
              "torch_dtype": "bfloat16"}
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer.json").write_text("{}")
    shard = "model-00001-of-00001.safetensors"
    save_file({"model.embed_tokens.weight": numpy.zeros((128, 64), dtype=numpy.float32)}, str(directory / shard))
    index = {"metadata": {"total_size": 128 * 64 * 4},
             "weight_map": {"model.embed_tokens.weight": shard}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


@pytest.fixture
def script(tmp_path: Path):
    """Writes a replay script (a JSON list of raw completions) and returns its path for --replay."""
    def write(steps: list[str]) -> str:
        path = tmp_path / "script.json"
        path.write_text(json.dumps(steps))
        return str(path)

    return write
