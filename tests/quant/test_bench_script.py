"""The CPU quantized bench runs end to end (one layer of the real shapes) and reports JSON; its
llama.cpp side (where the benchmark extra is installed) loads the GGUF it writes and takes
cached contexts through llama.cpp's state API."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_bench_cpu_quant_reports_speeds_and_memory(tmp_path):
    out = tmp_path / "result.json"
    args = ["--layers", "1", "--contexts", "64", "--decode-steps", "1", "--prefill-tokens", "16", "--depth", "32",
            "--repeats", "1", "--json", str(out)]  # fmt: skip
    done = subprocess.run(
        [sys.executable, "scripts/bench_cpu_quant.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert result["layers"] == 1 and result["quantization"] == "int4"
    ours = result["engines"]["glmcode"]
    assert ours["prefill_16"]["median"] > 0 and ours["prefill_16_at_32"]["median"] > 0 and ours["decode_64"]["median"] > 0
    assert 0 < ours["peak_rss_gb"]["median"] < 8
    assert "prefill_16 tok/s" in done.stderr  # the table


TINY = {  # llama.cpp's deepseek2 layout at toy sizes (rows of whole 32-value Q4_0 blocks)
    "vocab_size": 512, "hidden_size": 256, "intermediate_size": 512, "moe_intermediate_size": 128,
    "num_hidden_layers": 2, "num_attention_heads": 4, "q_lora_rank": 128, "kv_lora_rank": 128,
    "qk_nope_head_dim": 32, "qk_rope_head_dim": 32, "v_head_dim": 32, "n_routed_experts": 8,
    "n_shared_experts": 1, "num_experts_per_tok": 2, "first_k_dense_replace": 1, "routed_scaling_factor": 1.8,
    "norm_topk_prob": True, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "max_position_embeddings": 4096,
}  # fmt: skip


def test_llama_cpp_side_runs_the_gguf_it_writes(tmp_path):
    pytest.importorskip("llama_cpp", reason="the benchmark extra (llama-cpp-python) is not installed")
    pytest.importorskip("gguf")
    spec = importlib.util.spec_from_file_location("llama_cpp_side", ROOT / "scripts" / "llama_cpp_side.py")
    side = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(side)
    path = side.write_gguf(TINY, tmp_path / "tiny.gguf", progress=None)
    engine = side.LlamaCppEngine(path, threads=1, n_ctx=1024)
    assert engine.vocab == TINY["vocab_size"]
    engine.fill_context(300, np.random.default_rng(0))  # 300 cached positions, no compute
    assert engine.llm.n_tokens == 300
    engine.decode_step(7)
    logits = np.ctypeslib.as_array(engine.llm._ctx.get_logits(), shape=(engine.vocab,))
    assert np.isfinite(logits).all() and logits.std() > 0
    engine.prefill(list(range(3, 40)))
    engine.drop_after(300)
    assert engine.llm.n_tokens == 300
