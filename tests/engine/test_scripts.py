"""The engine's scripts run end to end as a user would run them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from glmcode.engine import LLM, SamplingParams
from tests.conftest import ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )  # fmt: skip


def test_make_tiny_checkpoint_cli_writes_a_loadable_checkpoint(tmp_path: Path):
    out = tmp_path / "ckpt"
    done = run_script("scripts/make_tiny_checkpoint.py", str(out), "--shards", "2",
                      "--set", "num_hidden_layers=2", "--set", "q_lora_rank=null")  # fmt: skip
    assert done.returncode == 0, done.stderr
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 2 and config["q_lora_rank"] is None
    assert config["rope_scaling"] is None and "first_k_dense_replace" in config  # the real form
    assert len(list(out.glob("model-*-of-00002.safetensors"))) == 2
    llm = LLM(out, kv_cache_memory=1 << 20, progress=False)
    assert len(llm.generate([1, 2, 3], SamplingParams(max_tokens=3, stop_token_ids=[])).token_ids) == 3


def test_bench_engine_reports_both_engines(tmp_path: Path):
    out = tmp_path / "bench.json"
    done = run_script("scripts/bench_engine.py", "--config", "tiny", "--contexts", "64,256",
                      "--prefill-tokens", "32", "--prefill-repeats", "1", "--decode-steps", "2",
                      "--hf-decode-steps", "1", "--rounds", "1", "--threads", "1", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "decode tok/s @ 256" in done.stdout
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["glmcode", "transformers"]
    for result in report["results"]:
        assert result["prefill_tokens_per_s"] > 0
        assert set(result["decode_tokens_per_s"]) == {"64", "256"}
    assert set(report["speedup_decode"]) == {"64", "256"}
