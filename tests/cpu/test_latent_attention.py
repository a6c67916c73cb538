"""A prefill chunk's attention in one kernel call: on AMX-BF16 tiles (cpu_attention.cpp) or, in the
AVX2 form, in 16-bit fixed point (cpu_attention_avx2.cpp). The kernel against a float reference,
and the fused runner's prefill that uses it against the module path.

Where the kernel is unavailable (and with it turned off, which these tests also do) the runner
keeps the torch form, so both paths are checked here. tests/cpu/test_avx2_form.py runs these
tests again on the AVX2 form where the AVX-512 one is built.
"""

import dataclasses

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.runner import FusedCpuRunner
from glmcode.engine.kv_cache import LayerCache
from glmcode.engine.model.attention import EXPANDED_MAX_CONTEXT
from glmcode.engine.quant.latent_cache import dequantize_latent, quantize_latent
from glmcode.engine.runner import ModuleRunner
from tests.conftest import load_tiny_checkpoint_writer
from tests.engine.stepping import new_sequence

pytestmark = pytest.mark.skipif(
    not cpu_kernels.available() or not cpu_kernels.latent_attention_available(),
    reason="needs our CPU kernels, on AVX2 or AMX-BF16",
)


def reference(queries: torch.Tensor, limits: torch.Tensor, rows: torch.Tensor, latent: int) -> torch.Tensor:
    scores = queries.float() @ rows.float().T
    masked = scores.masked_fill(torch.arange(rows.shape[0])[None, :] > limits[:, None], float("-inf"))
    return torch.softmax(masked, -1) @ rows[:, :latent].float()


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got - expected).norm() / expected.norm()).item()


# (query rows, context, cached values per token, latent part): rows and context not multiples of
# the 32-row blocks, the 16-key tiles or the 256-key pieces; several pieces and row groups; the
# real 576 / 512 and a small 96 / 64.
SHAPES = [(40, 37, 576, 512), (700, 1000, 576, 512), (130, 300, 96, 64)]


@pytest.mark.parametrize("rows, context, width, latent", SHAPES)
@pytest.mark.parametrize("storage", ["bfloat16", "int8"])
@pytest.mark.parametrize("mask", ["causal", "random"])
def test_the_kernel_matches_a_float_reference(rows, context, width, latent, storage, mask):
    torch.manual_seed(0)
    slots = (context + 40) // 16 * 16 + 16
    values = torch.randn(slots, width)
    if storage == "int8":
        flat, scales = quantize_latent(values, latent)
        values = dequantize_latent(flat, scales, latent)
        if cpu_kernels.avx512_available():  # the AMX kernel rounds the rows to bf16; the AVX2 one takes the int8 values
            values = values.bfloat16().float()
    else:
        flat, scales = values.bfloat16(), None
        values = flat.float()
    cache = LayerCache(flat, scales, 16, torch.bfloat16, latent)
    context_slots = torch.randperm(slots)[:context]  # scattered, in no order
    queries = (torch.randn(rows, width) * 3 * width**-0.5).bfloat16()
    if mask == "causal":  # a chunk's last tokens over the context, head-major rows of 4 heads
        tokens = -(-rows // 4)
        limits = (context - tokens + torch.arange(tokens)).repeat(4)[:rows]
    else:
        limits = torch.randint(0, context, (rows,))
    got = torch.empty(1, rows, latent)
    # scaled by 2 in the kernel (exact in bf16, so the reference scales the same rounded queries)
    cpu_kernels.latent_attention(queries[None, :, :latent], queries[None, :, latent:], 2.0, limits, cache, context_slots, got)
    # probabilities are rounded to bfloat16 before they weight the latents
    assert relative_error(got[0], reference(2 * queries, limits, values[context_slots], latent)) < 3e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_kernel_takes_head_major_views_and_writes_into_one(dtype):
    """Queries and output as [heads, tokens, ...] slices of larger tensors (the SpanBatch's rows of
    one sequence), float32 or bf16, scaled in the kernel as torch's multiply would."""
    torch.manual_seed(0)
    heads, tokens, context, width, latent = 3, 50, 90, 96, 64
    cache = LayerCache(torch.randn(96, width).bfloat16(), None, 16, torch.bfloat16, latent)
    context_slots = torch.arange(context)
    queries = torch.randn(heads, tokens + 7, width).to(dtype)  # the sequence: tokens [4, 4 + tokens)
    q_latent, q_rope = queries[:, 4 : 4 + tokens, :latent], queries[:, 4 : 4 + tokens, latent:]
    limits = (context - tokens + torch.arange(tokens)).repeat(heads)
    out = torch.full((heads, tokens + 7, latent), 7.0, dtype=dtype)
    cpu_kernels.latent_attention(q_latent, q_rope, 0.3, limits, cache, context_slots, out[:, 4 : 4 + tokens])
    scaled = (queries[:, 4 : 4 + tokens] * 0.3).bfloat16().reshape(heads * tokens, width)
    expected = reference(scaled, limits, cache.flat[:context].float(), latent).view(heads, tokens, latent)
    assert relative_error(out[:, 4 : 4 + tokens].float(), expected) < (3e-3 if dtype == torch.float32 else 6e-3)
    assert (out[:, :4] == 7).all() and (out[:, 4 + tokens :] == 7).all()  # nothing written outside the view


def test_a_limit_outside_the_context_is_refused():
    cache = LayerCache(torch.zeros(32, 96, dtype=torch.bfloat16), None, 16, torch.bfloat16, 64)
    queries = torch.zeros(1, 4, 96, dtype=torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside the context"):
        cpu_kernels.latent_attention(queries[..., :64], queries[..., 64:], 1.0, torch.tensor([0, 1, 2, 20]), cache,
                                     torch.arange(20), torch.empty(1, 4, 64))  # fmt: skip


@pytest.fixture(scope="module")
def tile_shaped(tmp_path_factory):
    """A tiny checkpoint with 96 cached values per token (a multiple of 32, as the tiles need)."""
    return load_tiny_checkpoint_writer().make_tiny_checkpoint(
        tmp_path_factory.mktemp("tile-shaped"), kv_lora_rank=64, qk_rope_head_dim=32
    )


# On the modules, chunks over contexts of up to EXPANDED_MAX_CONTEXT tokens take the expanded
# form, the five after it the absorbed one (up to 2,240 tokens deep); the fused runner computes
# every chunk in the absorbed form, on the kernel.
CHUNK = 48
# int8 weights: the fused runner takes them on AVX2 too (bf16 weights need AVX512_BF16 there)
QUANTIZATION = "int8"
PROMPT = [5 + (7 * i) % 150 for i in range(EXPANDED_MAX_CONTEXT + 5 * CHUNK)]


@torch.inference_mode()
def chunked_prefill_logits(llm: LLM, runner) -> torch.Tensor:
    """Logits of every prompt position, prefilled CHUNK tokens at a time: [len(PROMPT), vocab]."""
    seq = new_sequence(PROMPT)
    assert llm.blocks.allocate(seq, use_prefix_cache=False)
    rows = []
    for start in range(0, len(PROMPT), CHUNK):
        end = min(len(PROMPT), start + CHUNK)
        rows.append(runner.logits(runner.prefill(seq, start, end)))
    llm.blocks.free_sequence(seq)
    return torch.cat(rows)


def attends_in_the_kernel(llm: LLM) -> bool:
    """Whether the runner's prefill batches of the first and the last chunk carry the kernel's
    attention (in the absorbed form: the first would be expanded on the modules)."""
    seq = new_sequence(PROMPT)
    assert llm.blocks.allocate(seq, use_prefix_cache=False)
    try:
        batches = [llm.runner.prefill_batch(seq, start, start + CHUNK) for start in (0, len(PROMPT) - CHUNK)]
        in_kernel = [batch.latent_attention is not None and not batch.expanded for batch in batches]
        assert in_kernel[0] == in_kernel[1]
        return in_kernel[0]
    finally:
        llm.blocks.free_sequence(seq)


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.cosine_similarity(a, b, dim=-1).mean().item()


def turned_off(monkeypatch):
    """The runner's fallback: what a CPU without the kernel gets."""
    monkeypatch.setattr(cpu_kernels, "latent_attention_available", lambda: False)


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_the_fused_prefill_is_as_close_to_float32_as_the_modules(tile_shaped, kv_cache_dtype, monkeypatch):
    options = {"block_size": 16, "prefill_chunk_tokens": CHUNK, "enable_prefix_caching": False, "progress": False}
    expected = chunked_prefill_logits(fp32 := LLM(tile_shaped, dtype="float32", **options), fp32.runner)
    llm = LLM(tile_shaped, dtype="bfloat16", quantization=QUANTIZATION, kv_cache_dtype=kv_cache_dtype, **options)
    if not isinstance(llm.runner, FusedCpuRunner):
        pytest.skip("the fused CPU runner does not take this cache here (an int8 cache needs AVX512_BF16)")
    assert attends_in_the_kernel(llm)
    kernel = chunked_prefill_logits(llm, llm.runner)
    modules = chunked_prefill_logits(llm, ModuleRunner(llm.model, llm.kv_cache))
    turned_off(monkeypatch)
    assert not attends_in_the_kernel(llm)
    fallback = chunked_prefill_logits(llm, llm.runner)
    # a bf16 model of random weights is far from float32 at a few positions: compare on average
    for logits in (kernel, fallback):
        assert similarity(logits, expected) > 0.995
        assert similarity(logits, expected) >= similarity(modules, expected) - 1e-3
        assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_greedy_generation_after_a_chunked_prefill_is_the_same_with_and_without_the_kernel(tile_shaped, monkeypatch):
    """The kernel against torch computing the same (absorbed) form: the same greedy tokens. (The
    expanded form, which the fallback takes over short contexts, rounds differently, and this
    random model's logits are so flat that greedy decoding then parts ways within a few dozen
    tokens, as float32's does from either; the test above compares the forms against float32.)"""
    llm = LLM(tile_shaped, dtype="bfloat16", quantization=QUANTIZATION, block_size=16, prefill_chunk_tokens=CHUNK,
              enable_prefix_caching=False, progress=False)  # fmt: skip
    params = SamplingParams(max_tokens=48, temperature=0, stop_token_ids=[])
    kernel = llm.generate(PROMPT, params).token_ids
    runner_batch = llm.runner.prefill_batch
    monkeypatch.setattr(llm.runner, "prefill_batch", lambda *args: dataclasses.replace(runner_batch(*args), expanded=False))
    turned_off(monkeypatch)
    fallback = llm.generate(PROMPT, params).token_ids
    assert len(kernel) == 48
    # AMX against torch in bf16: the same rounding, the same 48 tokens. The AVX2 kernel rounds
    # about as bf16 does, its fallback computes in float32: on these flat logits greedy decoding
    # parts ways after some 20 tokens (measured), as float32 and bf16 do.
    same = 48 if cpu_kernels.avx512_available() else 16
    assert kernel[:same] == fallback[:same]
