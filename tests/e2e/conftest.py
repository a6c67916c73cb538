"""End to end: the real `glmcode` command in a subprocess, against a fake GLM server on 127.0.0.1,
over a real git repository whose real pytest suite fails until the bug is fixed.

Every run goes through `GlmcodeRunner`, which keeps what the run printed, so a test can also
grep all of it (and the files the run left behind) for the API key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.cli.conftest import clean_env

# Recognizable, and in the shape the session scrubber does NOT know (no "sk-" prefix, not the
# Zhipu id.secret form), so only glmcode's own care keeps it out of what it writes.
API_KEY = "e2e-KEY-7f3a9c51d2b8e604"

BUGGY_PRICING = '''"""Prices of an order."""


def total_price(items):
    """The sum of price * quantity over (price, quantity) pairs."""
    total = 0
    for price, quantity in items:
        total += price + quantity
    return total
'''
PRICING_TESTS = '''from inventory.pricing import total_price


def test_empty_order_costs_nothing():
    assert total_price([]) == 0


def test_total_multiplies_price_by_quantity():
    assert total_price([(2.5, 4), (1, 3)]) == 13
'''
BUG_LINE = "total += price + quantity"
FIXED_LINE = "total += price * quantity"


def git(repo: Path, *args: str) -> str:
    command = ["git", "-c", "user.email=e2e@example.com", "-c", "user.name=e2e", *args]
    return subprocess.run(command, cwd=repo, check=True, capture_output=True, text=True).stdout


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A small package with a bug: total_price adds price and quantity instead of multiplying."""
    repo = tmp_path / "project"
    (repo / "inventory").mkdir(parents=True)
    (repo / "tests").mkdir()
    (repo / "inventory" / "__init__.py").write_text("")
    (repo / "inventory" / "pricing.py").write_text(BUGGY_PRICING)
    (repo / "tests" / "test_pricing.py").write_text(PRICING_TESTS)
    (repo / "pyproject.toml").write_text('[project]\nname = "inventory"\nversion = "0"\n\n[tool.pytest.ini_options]\n'
                                         'pythonpath = ["."]\n')
    git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-qm", "inventory with a pricing bug")
    return repo


# The project's own pytest runs need no plugins; loading this venv's (hypothesis...) costs ~2 s a run.
FAST_PYTEST = {"PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"}


def project_tests_pass(repo: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], cwd=repo,
                          capture_output=True, text=True, timeout=120, check=False, env={**os.environ, **FAST_PYTEST})


@dataclass
class Run:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


# A wrapper that makes 127.0.0.1 count as a hosted-API host (as open.bigmodel.cn does), so the
# hosted dialect can be exercised end to end against the fake server. Nothing else changes.
HOSTED_LAUNCHER = (
    "import sys; from glmcode.backends.remote import endpoint; "
    "endpoint._HOSTED_HOSTS['127.0.0.1'] = 'zhipu'; "
    "from glmcode.cli import main; sys.argv[0] = 'glmcode'; main()"
)


class GlmcodeRunner:
    """Runs `python -m glmcode ...` in `cwd` with HOME and the XDG dirs under `home`.

    The environment looks like a user's shell: the key in GLMCODE_API_KEY (and ZHIPUAI_API_KEY,
    for hosted-style runs) and this interpreter's bin directory first on PATH, as in an
    activated virtualenv, so the project's `python -m pytest` finds pytest (without plugin
    autoloading, which only costs time here).
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.runs: list[Run] = []

    def env(self, key_in_env: bool = True) -> dict[str, str]:
        keys = {"GLMCODE_API_KEY": API_KEY, "ZHIPUAI_API_KEY": API_KEY} if key_in_env else {}
        env = clean_env(self.home, **keys, **FAST_PYTEST)
        env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
        return env

    def __call__(self, *args: str, cwd: Path, input: str = "", hosted: bool = False, key_in_env: bool = True) -> Run:
        """key_in_env=False: the key is not in the environment (e.g. it is in the config file)."""
        launcher = ["-c", HOSTED_LAUNCHER] if hosted else ["-m", "glmcode"]
        done = subprocess.run([sys.executable, *launcher, *args], cwd=cwd, env=self.env(key_in_env), input=input,
                              capture_output=True, text=True, timeout=120, check=False)
        run = Run(tuple(args), done.returncode, done.stdout, done.stderr)
        self.runs.append(run)
        return run

    def session_files(self) -> list[Path]:
        return sorted((self.home / "data" / "glmcode" / "sessions").glob("*.jsonl"))


@pytest.fixture
def glmcode(tmp_path: Path) -> GlmcodeRunner:
    home = tmp_path / "home"
    home.mkdir()
    return GlmcodeRunner(home)
