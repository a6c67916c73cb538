"""The CLI over the real local engine, on a tiny random checkpoint in the real layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glmcode.console import validate_event

from .conftest import REPO_ROOT, Cli

pytest.importorskip("glmcode.engine.llm", reason="needs the engine branch merged")
pytest.importorskip("glmcode.agent.loop", reason="needs the agent branch merged")
if not (REPO_ROOT / "scripts" / "make_tiny_checkpoint.py").is_file():
    pytest.skip("needs scripts/make_tiny_checkpoint.py", allow_module_level=True)


def tiny_checkpoint(directory: Path, **overrides: int) -> Path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    try:
        from make_tiny_checkpoint import make_tiny_checkpoint
    finally:
        sys.path.remove(str(REPO_ROOT / "scripts"))
    return make_tiny_checkpoint(directory, **overrides)


def test_a_prompt_larger_than_the_context_exits_4(cli: Cli, tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=1024)
    result = cli("ask", "hi", "--model", str(model), "--device", "cpu", "-o", "json")
    assert result.returncode == 4, result.stderr
    record = json.loads(result.stdout)
    assert validate_event(record) == [] and "context holds 1024" in record["error"]


@pytest.mark.slow
def test_ask_runs_on_the_local_engine(cli: Cli, tmp_path: Path) -> None:
    model = tiny_checkpoint(tmp_path / "tiny", max_position_embeddings=16384)
    result = cli("ask", "hi", "--model", str(model), "--device", "cpu", "-o", "stream-json",
                 env={"GLMCODE_MAX_OUTPUT_TOKENS": "8", "GLMCODE_TEMPERATURE": "0"}, timeout=300)
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(validate_event(record) == [] for record in records)
    assert records[0]["backend"] == "local" and records[0]["model"] == "tiny"
    usage = records[-1]["usage"]
    assert usage["prompt_tokens"] > 1000 and 0 < usage["completion_tokens"] <= 8
