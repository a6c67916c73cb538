"""The CPU quantized bench runs end to end (one layer of the real shapes) and reports JSON."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_cpu_quant_reports_speeds_and_memory(tmp_path):
    out = tmp_path / "result.json"
    args = ["--layers", "1", "--contexts", "64", "--decode-steps", "1", "--prefill-tokens", "16", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "scripts/bench_cpu_quant.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["quantization"] == "int4"
    assert result["prefill_16"] > 0 and result["decode_64"] > 0
    assert 0 < result["peak_rss_gb"] < 8
