"""Quantized models end to end on tiny checkpoints: quantize, load, generate, agree with float32."""

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.quant.checkpoint import quantization_config, quantize_checkpoint
from glmcode.engine.quant.experts import QuantizedExperts, StackedInt4Experts
from glmcode.engine.quant.linear import Int4Linear, Int8Linear
from glmcode.errors import CheckpointError, UsageError
from tests.conftest import load_tiny_checkpoint_writer
from tests.training import train_tiny_checkpoint

GREEDY = SamplingParams(max_tokens=256, temperature=0, stop_token_ids=[])


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops; also makes the brief training deterministic
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality")
    random = load_tiny_checkpoint_writer().make_tiny_checkpoint(root / "random")
    return train_tiny_checkpoint(random, root / "trained", steps=60, seed=0)


def _top1_agreement(reference: LLM, quantized: LLM, token_ids: list[int], first: int) -> float:
    positions = slice(first, first + 256)
    expected = reference.score(token_ids)[positions, : reference.num_real_tokens].argmax(-1)
    got = quantized.score(token_ids)[positions, : quantized.num_real_tokens].argmax(-1)
    return (got == expected).float().mean().item()


@pytest.mark.parametrize(("quantization", "threshold"), [("int8", 0.98), ("int4", 0.90), ("int4-all", 0.90)])
def test_greedy_top1_agrees_with_float32(trained_checkpoint, tmp_path, quantization, threshold):
    """The float32 model's greedy continuation, teacher-forced through the quantized model."""
    reference = LLM(trained_checkpoint, progress=False)
    prompt = reference.tokenizer.encode(load_tiny_checkpoint_writer().TRAINING_TEXT)[:8]
    continuation = reference.generate(prompt, GREEDY).token_ids
    assert len(continuation) == 256

    bits, linear_bits = {"int8": (8, 8), "int4": (4, 8), "int4-all": (4, 4)}[quantization]
    quantized_dir = quantize_checkpoint(trained_checkpoint, tmp_path / "q", bits=bits, linear_bits=linear_bits, progress=False)
    quantized = LLM(quantized_dir, progress=False)
    agreement = _top1_agreement(reference, quantized, prompt + continuation, len(prompt) - 1)
    print(f"{quantization} top-1 agreement with float32: {agreement:.3f}")
    assert agreement >= threshold, f"{quantization}: top-1 agreement {agreement:.3f} < {threshold}"


def test_quantized_checkpoint_loads_with_quantized_modules_and_generates(tiny_checkpoint, tmp_path):
    quantized_dir = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", bits=4, progress=False)
    llm = LLM(quantized_dir, progress=False)
    layer = llm.model.model.layers[1]
    if cpu_kernels.available():
        assert isinstance(layer.mlp.experts, StackedInt4Experts)
    else:
        assert isinstance(layer.mlp.experts.gate_up[0], Int4Linear)
    assert isinstance(layer.mlp.shared_experts.gate_up_proj, Int4Linear)
    assert isinstance(layer.self_attn.q_b_proj, Int8Linear)
    assert isinstance(llm.model.lm_head, Int8Linear)
    prompt = llm.tokenizer.encode("def fibonacci(n):")
    completion = llm.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[]))
    assert len(completion.token_ids) == 12
    # the same weights quantized at load give the same tokens
    at_load = LLM(tiny_checkpoint, quantization="int4", progress=False)
    assert at_load.generate(prompt, SamplingParams(max_tokens=12, temperature=0, stop_token_ids=[])).token_ids == completion.token_ids


def test_quantized_checkpoint_problems_are_clear_errors(tiny_checkpoint, tmp_path):
    quantized_dir = quantize_checkpoint(tiny_checkpoint, tmp_path / "q", bits=8, progress=False)
    with pytest.raises(UsageError, match="already quantized .int8 experts"):
        LLM(quantized_dir, quantization="int4", progress=False)
    with pytest.raises(UsageError, match="unknown quantization"):
        LLM(quantized_dir, quantization="int3", progress=False)
    LLM(quantized_dir, quantization="int8", progress=False)  # matches what is stored
    with pytest.raises(UsageError, match="unknown quantization"):
        LLM(tiny_checkpoint, quantization="int3", progress=False)
    shard = sorted(quantized_dir.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="truncated"):
        LLM(quantized_dir, progress=False)


def test_int8_latent_cache_decodes_like_the_bfloat16_cache(trained_checkpoint):
    """Same greedy tokens, through prefill, prefix reuse and decode, in about half the memory."""
    full = LLM(trained_checkpoint, kv_cache_memory=1 << 18, block_size=16, progress=False)
    small = LLM(trained_checkpoint, kv_cache_memory=1 << 18, block_size=16, kv_cache_dtype="int8", progress=False)
    assert small.kv_cache.num_blocks > 1.9 * full.kv_cache.num_blocks
    prompt = full.tokenizer.encode(load_tiny_checkpoint_writer().TRAINING_TEXT)[:40]
    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[])
    expected = full.generate(prompt, params).token_ids
    got = small.generate(prompt, params).token_ids
    assert sum(a == b for a, b in zip(got, expected)) >= 0.9 * len(expected)
    again = small.generate(prompt, params)  # served from the int8 prefix cache
    assert again.token_ids == got and again.stats.cached_tokens >= 32
    with pytest.raises(UsageError, match="kv_cache_dtype"):
        LLM(trained_checkpoint, kv_cache_dtype="fp8", progress=False)


def test_cli_quantizes_a_checkpoint_that_then_loads_and_generates(tiny_checkpoint, tmp_path):
    pytest.importorskip("glmcode.cli", reason="the CLI (branch cli) has not been merged yet")
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    destination = tmp_path / "tiny-int4"
    done = subprocess.run(
        [sys.executable, "-m", "glmcode", "model", "quantize", str(tiny_checkpoint), str(destination), "--bits", "4",
         "--linear-bits", "4"],
        cwd=root, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert str(destination) in done.stdout
    assert quantization_config(destination)["linear_bits"] == 4
    llm = LLM(destination, progress=False)
    assert isinstance(llm.model.model.layers[1].mlp.experts, (StackedInt4Experts, QuantizedExperts))
    completion = llm.generate(llm.tokenizer.encode("import os"), SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[]))
    assert len(completion.token_ids) == 5
    again = subprocess.run(
        [sys.executable, "-m", "glmcode", "model", "quantize", str(tiny_checkpoint), str(destination)],
        cwd=root, capture_output=True, text=True, timeout=300,
    )
    assert again.returncode == 2 and "not empty" in again.stderr and "Traceback" not in again.stderr
