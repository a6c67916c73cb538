"""The CPU fast path as a runner: prefill on the modules (its attention in the absorbed form at every
depth, in one kernel call: on AMX-BF16 tiles, or in int16 on AVX2), a batch-1 decode step as one
C++ call."""

from __future__ import annotations

import dataclasses

import torch

from glmcode.engine.cpu import kernels
from glmcode.engine.cpu.fused_decode import FusedDecoder
from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import SpanBatch
from glmcode.engine.runner import ModuleRunner
from glmcode.engine.sequence import Sequence


class FusedCpuRunner(ModuleRunner):
    def __init__(self, model: GlmMoeLite, kv_cache: KVCache, decoder: FusedDecoder):
        super().__init__(model, kv_cache)
        self.decoder = decoder
        config = model.config
        # the kernels take 32 values at a time, from a bf16 cache or an int8 one
        self.tile_shaped_cache = (
            kv_cache.dtype in (torch.bfloat16, torch.int8) and config.kv_cache_dim % 32 == 0 and config.kv_lora_rank % 32 == 0
        )

    @classmethod
    def for_model(cls, model: GlmMoeLite, kv_cache: KVCache) -> FusedCpuRunner | None:
        """None when the fused plan does not run this model or cache (see FusedDecoder.for_model)."""
        decoder = FusedDecoder.for_model(model, kv_cache)
        return None if decoder is None else cls(model, kv_cache, decoder)

    def prefill_batch(self, seq: Sequence, start: int, end: int) -> SpanBatch:
        """The absorbed form at every depth, even where the modules would expand the context
        (their rule was measured with bf16 products). On AMX-BF16 in one kernel call, without a
        score matrix: 25-32% faster than expanded at 0 to 1.5K tokens of context (512-token
        chunks, 20 heads). Over a cache read in float32 (AVX2), in torch: absorbed against
        expanded, 169 / 262 ms over no cached tokens, 417 / 546 over 1K, 1128 / 1230 over 4K
        (AMD EPYC Milan, 512-token chunks, 20 heads, 2 threads), before the absorbed form took
        a chunk's rows in causal blocks (attention.CAUSAL_BLOCK_ROWS), which only widened the gap.
        The AVX2 kernel (int16) is 1.2-1.4x that torch form (84 / 110 and 518 / 738 ms a chunk over
        0 and 4K cached tokens, same machine kind)."""
        batch = super().prefill_batch(seq, start, end)
        if self.tile_shaped_cache and kernels.latent_attention_available():
            return dataclasses.replace(batch, expanded=False, latent_attention=kernels.latent_attention)
        if self.kv_cache.compute_dtype == torch.float32:
            return dataclasses.replace(batch, expanded=False)
        return batch

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        if len(seqs) != 1:  # the plan decodes one sequence; batches share each weight read on the modules
            return super().decode(seqs)
        (seq,) = seqs
        return self.decoder.logits(seq.token_ids[-1], len(seq) - 1, seq.block_table, self.kv_cache)
