"""The CLI over the real local engine, on a tiny random checkpoint in the real layout."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from glmcode.console import validate_event
from tests.conftest import ctrl_c_default, ctrl_c_ignored

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


# The aten int4/int8 ops: our AVX-512 kernels would be compiled into the temporary HOME's cache
# on every run (tens of seconds); which kernels run does not matter to these tests.
ATEN_KERNELS = {"GLMCODE_CPU_KERNELS": "0"}


def test_quantization_flag_reaches_the_engine(cli: Cli, tmp_path: Path) -> None:
    from glmcode.engine.quant.checkpoint import quantize_checkpoint

    # The engine refuses to read an int4 checkpoint as int8: proof the flag got there. (Loading with
    # the flag is shown by the Ctrl-C test below, and in tests/quant.)
    int4_model = quantize_checkpoint(tiny_checkpoint(tmp_path / "tiny"), tmp_path / "tiny-int4", bits=4, progress=False)
    other = cli("ask", "hi", "--model", str(int4_model), "--quantization", "int8", "--device", "cpu", env=ATEN_KERNELS)
    assert other.returncode == 2 and "already quantized" in other.stderr and "not as int8" in other.stderr, other.stderr


@pytest.mark.parametrize(("command", "started"), [
    (["ask", "hi"], ctrl_c_default),
    (["chat"], ctrl_c_ignored),  # a chat takes Ctrl-C back even from a background job's SIG_IGN
])
def test_ctrl_c_while_the_model_loads_exits_130_without_a_traceback(
    tmp_path: Path, home: Path, workdir: Path, command: list[str], started
) -> None:
    """At a terminal: wait for the loading progress (int4 on the fly: many tensors, seconds of
    work on this size), press Ctrl-C, and the command ends at once with 130 and one line."""
    pexpect = pytest.importorskip("pexpect")
    from .conftest import clean_env

    model = tiny_checkpoint(tmp_path / "many-tensors", num_hidden_layers=8, n_routed_experts=32, hidden_size=128,
                            moe_intermediate_size=128, intermediate_size=128)
    child = pexpect.spawn(sys.executable, ["-m", "glmcode", *command, "--model", str(model), "--device", "cpu",
                                           "--quantization", "int4"],
                          cwd=str(workdir), env=clean_env(home, **ATEN_KERNELS), encoding="utf-8", timeout=120,
                          dimensions=(24, 120), preexec_fn=started)
    try:
        child.expect(r"loading int4 weights.*?m(?!0\.0/)[\d.]+/[\d.]+ (?:kB|MB|GB)")  # some bytes read
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    shown = child.before or ""
    assert child.exitstatus == 130, shown
    assert "glmcode: interrupted while loading the model" in shown and "Traceback" not in shown, shown