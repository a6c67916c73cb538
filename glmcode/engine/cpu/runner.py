"""The CPU fast path as a runner: prefill on the modules, a batch-1 decode step as one C++ call."""

from __future__ import annotations

import torch

from glmcode.engine.cpu.fused_decode import FusedDecoder
from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.runner import ModuleRunner
from glmcode.engine.sequence import Sequence


class FusedCpuRunner(ModuleRunner):
    def __init__(self, model: GlmMoeLite, kv_cache: KVCache, decoder: FusedDecoder):
        super().__init__(model, kv_cache)
        self.decoder = decoder

    @classmethod
    def for_model(cls, model: GlmMoeLite, kv_cache: KVCache) -> FusedCpuRunner | None:
        """None when the fused plan does not run this model or cache (see FusedDecoder.for_model)."""
        decoder = FusedDecoder.for_model(model, kv_cache)
        return None if decoder is None else cls(model, kv_cache, decoder)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        if len(seqs) != 1:  # the plan decodes one sequence; batches share each weight read on the modules
            return super().decode(seqs)
        (seq,) = seqs
        return self.decoder.logits(seq.token_ids[-1], len(seq) - 1, seq.block_table, self.kv_cache)
