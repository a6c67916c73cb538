"""The engine's scripts run end to end as a user would run them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from glmcode.engine import LLM, SamplingParams
from tests.conftest import ROOT


def run_script(*args: str) -> subprocess.CompletedProcess:
    """A script in a bare environment, told where the CPU kernels are built (conftest builds
    them once; without it the script would compile them again, about 30 s). Its PATH starts
    with this interpreter's bin, as in an activated virtualenv: another ninja than the one that
    built them (the system's) cannot read the build's dependency log and rebuilds everything."""
    path = f"{Path(sys.executable).parent}:/usr/bin:/bin"
    env = {"PYTHONPATH": str(ROOT), "PATH": path, "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"]}
    return subprocess.run([sys.executable, *args], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)


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
                      "--hf-decode-steps", "1", "--rounds", "1", "--batch-sizes", "2", "--threads", "1",
                      "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "decode tok/s @ 256" in done.stdout and "batch 2 tok/s @ 512" in done.stdout
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names == ["glmcode", "transformers"]
    for result in report["results"]:
        assert result["prefill_tokens_per_s"]["32"] > 0
        assert set(result["decode_tokens_per_s"]) == {"64", "256"}
        assert result["batch_decode_tokens_per_s"]["2"] > 0
        assert list(result["kernels_per_decode_step"].values())[0] > 0  # top-level ops on a CPU
        assert not result["errors"]
    assert set(report["speedup_decode"]) == {"64", "256"}


def test_bench_engine_runs_the_kernel_path_with_its_fit_check(tmp_path: Path):
    """The CUDA path's bench code (padded decode buckets, eager profile, fit check) on a CPU."""
    out = tmp_path / "bench.json"
    done = run_script("scripts/bench_engine.py", "--config", "tiny", "--kernel-path", "--skip-hf",
                      "--contexts", "128", "--prefill-tokens", "100", "--prefill-repeats", "1",
                      "--decode-steps", "2", "--rounds", "1", "--batch-sizes", "3", "--fit-context", "1000",
                      "--threads", "1", "--json", str(out))  # fmt: skip
    assert done.returncode == 0, done.stderr
    (result,) = json.loads(out.read_text())["results"]
    assert set(result["kernels_per_decode_step"]) == {"padded step", "eager"}
    assert result["top_kernels"] and result["batch_decode_tokens_per_s"]["3"] > 0
    assert result["fit"]["context"] == 1000 and result["fit"]["cache_tokens"] >= 1000
    assert not result["errors"]


def test_bench_agent_steps_reuses_the_prefix_over_an_int8_cache():
    done = run_script("scripts/bench_agent_steps.py", "--config", "tiny", "--context", "600", "--tool-output", "64",
                      "--repeats", "1", "--threads", "1", "--kv-cache-dtype", "int8")  # fmt: skip
    assert done.returncode == 0, done.stderr
    report, _ = json.JSONDecoder().raw_decode(done.stdout)
    on, off = report["runs"]
    assert on["prefix_cache"] and not off["prefix_cache"]
    for run in (on, off):
        assert run["kv_cache"] == "int8"
        assert run["step2"]["prompt_tokens"] > run["step1"]["prompt_tokens"] > 500
    assert on["step2"]["cached_tokens"] >= 256 and off["step2"]["cached_tokens"] == 0
