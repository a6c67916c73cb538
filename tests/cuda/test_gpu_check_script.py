"""scripts/gpu_check.py (the prepared device check) runs end to end in its CPU smoke mode."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cuda.conftest import TRITON_SKIP_REASON

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=str(TRITON_SKIP_REASON))
def test_cpu_smoke_run_passes_every_kernel_check_and_times_every_kernel(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("TRITON_INTERPRET", None)  # the script sets it itself for --device cpu
    completed = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "--device", "cpu", "--out", str(out),
         "--sections", "checks,engine,mla,moe,ops"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report == json.loads(completed.stdout)
    assert report["all_checks_pass"]
    names = {check["name"] for check in report["checks"]}
    assert {"mla_decode fp8 per_token", "mla_decode fp8 per_tensor", "fused_moe T=3 (+shared)",
            "moe_align T=3", "rms_norm", "silu_mul"} <= names
    assert any(name.startswith("grouped_moe") for name in names)  # torch._grouped_mm runs on CPU
    mla_rows = [row for row in report["timings"]["mla_decode"] if "context" in row and "sweep" not in row]
    assert [(row["batch"], row["context"]) for row in mla_rows] == [(1, 24), (2, 40)]
    assert all(row["triton_ms"] > 0 and row["reference_ms"] > 0 for row in mla_rows)
    sweep = next(row["sweep"] for row in report["timings"]["mla_decode"] if "sweep" in row)
    assert {(row["context"], row["num_splits"], row["block_n"]) for row in sweep} == {(24, 2, 16), (24, 4, 16)}
    assert all(row["ms"] > 0 for row in sweep)
    assert {row["op"] for row in report["timings"]["small_ops"]} == {"add_rms_norm", "silu_mul", "rope_q_and_k"}
    engine = report["engine"]  # the kernel path on the references, against the fp32 CPU engine
    assert engine["kernel_path"] and len(engine["checks"]) == 6
    assert all(check["ok"] for check in engine["checks"])
