"""Runners compute a batch of tokens through the model: one implementation per execution path.

- `ModuleRunner` (here): the model's nn.Modules, op by op. Any device, any weights.
- `cpu.runner.FusedCpuRunner`: on a CPU with glmcode's kernels, a batch-1 decode step runs as
  one C++ call through every layer.
- `cuda.runner.CudaRunner`: the GPU kernels, decode steps replayed from CUDA graphs.

All three run the same model definition (engine/model) over the same paged KV cache;
`select_runner` picks one when the engine loads. A runner never decides what to run (the
scheduler does) and never samples (the engine does).
"""

from __future__ import annotations

from typing import Protocol

import torch

from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import SequenceSlice, SpanBatch, expanded_is_cheaper
from glmcode.engine.sequence import Sequence

# Attention scores of one context piece are kept under this many elements: 128 MB in bfloat16,
# which holds a 512-token chunk's scores over 6K keys at 20 heads. Each extra piece costs a merge
# of the chunk's outputs, about a fifth of the piece's own work.
MAX_SCORE_ELEMENTS = 1 << 26


class Runner(Protocol):
    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Computes positions [start, end) of `seq` (writing their latents into the cache);
        returns their final-normed hidden states [end - start, hidden]."""
        ...

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feeds each sequence's last token; returns float32 next-token logits [len(seqs), vocab]."""
        ...

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [T, hidden] -> float32 logits [T, vocab]."""
        ...


class ModuleRunner:
    """The model's modules, op by op, on whatever device the model lives on."""

    def __init__(self, model: GlmMoeLite, kv_cache: KVCache):
        self.model = model
        self.kv_cache = kv_cache
        self.device = kv_cache.data.device
        self.max_score_elements = MAX_SCORE_ELEMENTS

    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        return self.model(self._tensor(seq.token_ids[start:end]), self.prefill_batch(seq, start, end), self.kv_cache)

    def prefill_batch(self, seq: Sequence, start: int, end: int) -> SpanBatch:
        return SpanBatch(
            positions=torch.arange(start, end, device=self.device),
            write_slots=self._tensor(self.kv_cache.slots(seq, start, end)),
            sequences=[SequenceSlice(slice(0, end - start), start, self.kv_cache.spans(seq, end))],
            expanded=expanded_is_cheaper(self.model.config, end - start, end),
            max_score_elements=self.max_score_elements,
        )

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        batch = SpanBatch(
            positions=self._tensor([len(s) - 1 for s in seqs]),
            write_slots=self._tensor([self.kv_cache.slots(s, len(s) - 1, len(s))[0] for s in seqs]),
            sequences=[
                SequenceSlice(slice(i, i + 1), len(s) - 1, self.kv_cache.spans(s, len(s), whole_blocks=True))
                for i, s in enumerate(seqs)
            ],
            max_score_elements=self.max_score_elements,
        )
        return self.logits(self.model(self._tensor([s.token_ids[-1] for s in seqs]), batch, self.kv_cache))

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)


def select_runner(model: GlmMoeLite, kv_cache: KVCache, *, kernel_path: bool, max_num_seqs: int,
                  max_context: int, scratch_slot: int | None) -> Runner:  # fmt: skip
    """The runner for this model and cache: the CUDA kernels when asked, the fused CPU decode
    where the model is one its plan runs, else the modules."""
    if kernel_path:
        from glmcode.engine.cuda.runner import CudaRunner

        return CudaRunner(model, kv_cache, max_batch=max_num_seqs, max_context=max_context, scratch_slot=scratch_slot)
    from glmcode.engine.cpu.runner import FusedCpuRunner

    return FusedCpuRunner.for_model(model, kv_cache) or ModuleRunner(model, kv_cache)
