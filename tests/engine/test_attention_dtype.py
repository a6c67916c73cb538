"""A bfloat16 model attending in float32 (the cache read in float32, as on CPUs where torch has no
fast bfloat16 matmul): as close to the float32 model as attending in bfloat16, in every form the
module path takes (expanded and absorbed prefill chunks, decode steps)."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine import LLM
from glmcode.engine.kv_cache import KVCache, attention_dtype
from glmcode.engine.model.attention import EXPANDED_MAX_CONTEXT
from glmcode.engine.runner import ModuleRunner
from tests.engine.stepping import new_sequence

CHUNK = 64
# chunks over up to EXPANDED_MAX_CONTEXT tokens of context take the expanded form, the last three
# the absorbed one
PROMPT = [5 + (7 * i) % 150 for i in range(EXPANDED_MAX_CONTEXT + 3 * CHUNK)]
DECODED = [11, 42, 97, 3]
OPTIONS = {"block_size": 16, "prefill_chunk_tokens": CHUNK, "enable_prefix_caching": False, "progress": False,
           "kv_cache_memory": 32 << 20}  # fmt: skip


@torch.inference_mode()
def logits_of_every_step(llm: LLM, runner: ModuleRunner) -> torch.Tensor:
    """The prompt prefilled CHUNK tokens at a time, then DECODED fed one decode step each: the
    logits of every prompt position and of every decode step."""
    seq = new_sequence(PROMPT)
    assert llm.blocks.allocate(seq, use_prefix_cache=False)
    rows = []
    for start in range(0, len(PROMPT), CHUNK):
        rows.append(runner.logits(runner.prefill(seq, start, min(len(PROMPT), start + CHUNK))))
    seq.num_computed = len(seq)
    for token in DECODED:
        seq.token_ids.append(token)
        assert llm.blocks.grow(seq, len(seq))
        rows.append(runner.decode([seq]))
        seq.num_computed = len(seq)
    llm.blocks.free_sequence(seq)
    return torch.cat(rows)


def cache_reading_in(llm: LLM, compute_dtype: torch.dtype) -> KVCache:
    """A cache like the engine's (same storage, blocks and layout) whose reads return compute_dtype."""
    own = llm.kv_cache
    num_blocks = own.data.shape[1] // llm.block_size
    return KVCache(llm.config, num_blocks, llm.block_size, own.dtype, llm.device, compute_dtype=compute_dtype)


def similarity(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.cosine_similarity(a.float(), b.float(), dim=-1).mean().item()


@pytest.mark.parametrize("kv_cache_dtype", [None, "int8"])
def test_float32_attention_of_a_bfloat16_model_is_as_close_to_float32(tiny_checkpoint, kv_cache_dtype):
    fp32 = LLM(tiny_checkpoint, dtype="float32", **OPTIONS)
    expected = logits_of_every_step(fp32, ModuleRunner(fp32.model, fp32.kv_cache))
    llm = LLM(tiny_checkpoint, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype, **OPTIONS)
    in_bf16 = logits_of_every_step(llm, ModuleRunner(llm.model, cache_reading_in(llm, torch.bfloat16)))
    in_fp32 = logits_of_every_step(llm, ModuleRunner(llm.model, cache_reading_in(llm, torch.float32)))
    assert similarity(in_fp32, expected) > 0.995
    assert similarity(in_fp32, expected) >= similarity(in_bf16, expected) - 1e-3
    assert (in_fp32.argmax(-1) == expected.argmax(-1)).float().mean() >= 0.9


def test_the_engine_reads_the_cache_in_float32_only_for_bfloat16_on_a_cpu_without_onednn_bf16():
    cpu = torch.device("cpu")
    fast_bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert attention_dtype(torch.bfloat16, cpu) == (torch.bfloat16 if fast_bf16 else torch.float32)
    assert attention_dtype(torch.float32, cpu) == torch.float32
    assert attention_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
