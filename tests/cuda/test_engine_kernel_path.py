"""The engine's CUDA path (cuda_runner), run on CPU tensors, against the CPU engine.

LLM(..., kernel_path=True) runs the code the GPU runs: block tables and seq_lens as tensors,
mla_decode over the paged latent cache, fused MoE with the shared expert folded in, fused norms
and rope, SDPA for expanded prefill, and the decode step on the padded static buffers of its
batch bucket. Here the kernels answer with their PyTorch references (and, in one test, with the
Triton kernels in Triton's interpreter); only CUDA-graph capture and replay are left to the GPU
check (scripts/gpu_check.py).
"""

from __future__ import annotations


import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine import ops
from glmcode.engine.cuda.runner import ABSORBED_PREFILL_MAX_TOKENS, CudaRunner, batch_buckets
from glmcode.engine.kv_cache import LayerCache
from glmcode.engine.quant.latent_cache import quantize_fp8_per_token
from glmcode.errors import UsageError
from tests.conftest import load_tiny_checkpoint_writer
from tests.cuda.conftest import TRITON_SKIP_REASON
from tests.engine.conftest import CONFIGS
from tests.engine.stepping import decode, new_sequence, prefill, teacher_forced_logits
from tests.engine.test_generation import fragment_free_list, prompt

GREEDY = SamplingParams(max_tokens=16, temperature=0, stop_token_ids=[])


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_llm(path, **kwargs) -> LLM:
    options = {"dtype": "float32", "kv_cache_memory": 8 << 20, "block_size": 16, "progress": False}
    return LLM(path, **(options | kwargs))


@pytest.fixture(scope="module")
def cpu_llm(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint)


@pytest.fixture(scope="module")
def kernel_llm(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint, kernel_path=True)


def test_the_kernel_path_is_what_cuda_gets_and_what_tests_ask_for(tiny_checkpoint, cpu_llm, kernel_llm):
    assert not isinstance(cpu_llm.runner, CudaRunner) and not cpu_llm.kernel_path
    assert isinstance(kernel_llm.runner, CudaRunner)
    assert kernel_llm.runner.use_graphs is False  # captured only on CUDA
    # one scratch block beyond those the block manager hands out
    assert kernel_llm.kv_cache.num_blocks == kernel_llm.blocks.num_blocks + 1


@pytest.mark.parametrize("block_size", [3, 16])
def test_paged_decode_logits_equal_the_cpu_engine(tiny_checkpoint, cpu_llm, block_size):
    llm = make_llm(tiny_checkpoint, kernel_path=True, block_size=block_size)
    tokens = prompt(llm, 3)
    expected = cpu_llm.score(tokens)
    torch.testing.assert_close(llm.score(tokens), expected, atol=1e-4, rtol=0)
    fragment_free_list(llm)  # the sequence's blocks are scattered over the pool
    decoded = teacher_forced_logits(llm, tokens, prefill_len=7)
    torch.testing.assert_close(decoded, expected[6:], atol=1e-4, rtol=0)


def test_greedy_tokens_equal_the_cpu_engine(cpu_llm, kernel_llm):
    tokens = prompt(cpu_llm, 2)
    assert kernel_llm.generate(tokens, GREEDY).token_ids == cpu_llm.generate(tokens, GREEDY).token_ids


@pytest.mark.parametrize("shape", ["no_q_lora", "wide_moe", "top1_grouped"])
def test_other_checkpoint_shapes(tmp_path_factory, shape):
    """A single q_proj (fused with kv_a), 16 experts top-4, group-limited top-1 routing."""
    path = load_tiny_checkpoint_writer().make_tiny_checkpoint(tmp_path_factory.mktemp(shape), **CONFIGS[shape])
    cpu, kernel = make_llm(path), make_llm(path, kernel_path=True, block_size=4)
    tokens = prompt(cpu, 3)
    torch.testing.assert_close(kernel.score(tokens), cpu.score(tokens), atol=1e-4, rtol=0)
    assert kernel.generate(tokens[:30], GREEDY).token_ids == cpu.generate(tokens[:30], GREEDY).token_ids


@pytest.mark.parametrize("chunk", [7, 100])
def test_chunked_prefill_absorbed_and_expanded(tiny_checkpoint, cpu_llm, chunk):
    """7-token chunks attend as paged decode queries, 100-token chunks expand through SDPA (the
    second one offset: its queries sit at the bottom-right of a longer context)."""
    tokens = prompt(cpu_llm, 5)
    assert len(tokens) > 100
    assert (chunk <= ABSORBED_PREFILL_MAX_TOKENS) == (chunk == 7)
    llm = make_llm(tiny_checkpoint, kernel_path=True, prefill_chunk_tokens=chunk, block_size=4)
    fragment_free_list(llm)
    torch.testing.assert_close(llm.score(tokens), cpu_llm.score(tokens), atol=1e-4, rtol=0)
    assert llm.generate(tokens, GREEDY).token_ids == cpu_llm.generate(tokens, GREEDY).token_ids


def test_batch_of_different_lengths_decodes_in_padded_buckets(tiny_checkpoint, cpu_llm):
    prompts = [prompt(cpu_llm, n)[: 9 + 13 * n] for n in (1, 2, 3)]
    params = [SamplingParams(max_tokens=n, temperature=0, stop_token_ids=[]) for n in (12, 5, 9)]
    expected = [cpu_llm.generate(p, sp).token_ids for p, sp in zip(prompts, params)]
    llm = make_llm(tiny_checkpoint, kernel_path=True, block_size=4, max_num_seqs=4)
    assert llm.runner.graphed.buckets == (1, 2, 4)
    # 3 sequences run in bucket 4, then 2 in bucket 2, then 1: padded rows every step but the last ones
    assert [r.token_ids for r in llm.generate_batch(prompts, params)] == expected
    assert len(llm.blocks.free) == llm.blocks.num_blocks


def test_padded_rows_write_only_the_scratch_slot(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, kernel_path=True, block_size=4, max_num_seqs=4)
    seqs = [new_sequence(prompt(llm)[: 5 + i]) for i in range(3)]
    for seq in seqs:
        assert llm.blocks.allocate(seq)
        prefill(llm, seq)
        seq.token_ids.append(7)
        assert llm.blocks.grow(seq, len(seq))
    before = llm.kv_cache.data.clone()
    decode(llm, seqs)
    changed = (llm.kv_cache.data != before).any(-1).any(0).nonzero().flatten().tolist()
    written = [llm.kv_cache.slots(s, len(s) - 1, len(s))[0] for s in seqs]
    scratch = llm.blocks.num_blocks * llm.block_size
    assert sorted(changed) == sorted(written + [scratch])


def test_warm_prefix_cache_gives_the_same_tokens_as_a_cold_start(tiny_checkpoint, cpu_llm):
    warm = make_llm(tiny_checkpoint, kernel_path=True, block_size=8)
    first = prompt(warm)
    step1 = warm.generate(first, GREEDY)
    second = first + step1.token_ids + warm.tokenizer.encode("<|observation|>result ok")
    step2 = warm.generate(second, GREEDY)
    assert step2.stats.cached_tokens >= len(first) - 8
    assert step2.token_ids == cpu_llm.generate(second, GREEDY).token_ids


def test_fp8_cache_equals_a_float_cache_holding_the_same_rounded_latents(tiny_checkpoint, monkeypatch):
    """The fp8 path (quantize on write, scales read back by both attention forms) computes what a
    float32 cache would if every written latent were rounded through fp8 with its scale."""
    llm = make_llm(tiny_checkpoint, kernel_path=True, kv_cache_dtype="fp8", block_size=4)
    cache = llm.kv_cache
    assert cache.data.dtype == torch.float8_e4m3fn and cache.scales.shape == cache.data.shape[:2]
    tokens = prompt(llm, 5)
    params = SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[])
    got_logits, got_tokens = llm.score(tokens), llm.generate(tokens, params).token_ids

    def rounded_write(self, slots, rows):
        values, scales = quantize_fp8_per_token(rows)
        self.flat.index_copy_(0, slots, values.float() * scales[:, None])

    monkeypatch.setattr(LayerCache, "write", rounded_write)
    rounded = make_llm(tiny_checkpoint, kernel_path=True, block_size=4)
    torch.testing.assert_close(got_logits, rounded.score(tokens), atol=1e-4, rtol=0)
    assert got_tokens == rounded.generate(tokens, params).token_ids


def test_fp8_cache_rows_keep_three_mantissa_bits_per_token(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, kernel_path=True, kv_cache_dtype="fp8")
    reference = make_llm(tiny_checkpoint)  # same pool order: the same blocks for the same prompt
    tokens = prompt(llm, 2)
    llm.score(tokens)
    reference.score(tokens)
    # Layer 0's latents do not depend on attention, so only the rounding separates them.
    slots = len(tokens)
    exact = reference.kv_cache.data[0, :slots]
    stored = llm.kv_cache.data[0, :slots].float()
    dequantized = stored * llm.kv_cache.scales[0, :slots, None]
    assert ((dequantized - exact).abs() <= exact.abs() / 16 + 1e-6 * exact.abs().amax()).all()
    assert (stored.abs().amax(-1) == 448).all()  # per-token scale: each row's amax maps to 448


def test_cache_and_weight_options_of_the_other_path_are_refused(tiny_checkpoint):
    with pytest.raises(UsageError, match="kernel path"):
        make_llm(tiny_checkpoint, kv_cache_dtype="fp8")
    with pytest.raises(UsageError, match="kv_cache_dtype"):
        make_llm(tiny_checkpoint, kernel_path=True, kv_cache_dtype="int3")
    with pytest.raises(UsageError, match="CPU path"):
        make_llm(tiny_checkpoint, kernel_path=True, kv_cache_dtype="int8")
    with pytest.raises(UsageError, match="CPU path only"):
        make_llm(tiny_checkpoint, kernel_path=True, quantization="int8")


def test_batch_buckets_end_at_the_batch_limit():
    assert batch_buckets(1) == (1,)
    assert batch_buckets(8) == (1, 2, 4, 8)
    assert batch_buckets(12) == (1, 2, 4, 8, 12)
    assert batch_buckets(32) == (1, 2, 4, 8, 16, 32)


@pytest.mark.skipif(TRITON_SKIP_REASON is not None, reason=str(TRITON_SKIP_REASON))
def test_triton_kernels_in_the_interpreter_give_the_cpu_engine_tokens(tiny_checkpoint, cpu_llm, monkeypatch):
    """The same path with every op that has a kernel running it (interpreted), not its PyTorch body."""
    tokens = prompt(cpu_llm)[:20]
    prompts = [tokens, tokens[:11], tokens[3:9]]  # three rows and a padded one in bucket 4
    params = SamplingParams(max_tokens=5, temperature=0, stop_token_ids=[])
    want_logits = cpu_llm.score(tokens)
    want_tokens = [cpu_llm.generate(p, params).token_ids for p in prompts]
    calls = []

    def every_tensor(tensor: torch.Tensor) -> bool:
        calls.append(tensor.shape)
        return True

    monkeypatch.setattr(ops, "uses_triton", every_tensor)
    llm = make_llm(tiny_checkpoint, kernel_path=True, block_size=4, max_num_seqs=4)
    torch.testing.assert_close(llm.score(tokens), want_logits, atol=1e-4, rtol=0)
    assert [c.token_ids for c in llm.generate_batch(prompts, params)] == want_tokens
    assert calls  # the ops did dispatch
