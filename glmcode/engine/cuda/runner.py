"""The CUDA path: static buffers and CUDA graphs around the one model.

On a GPU a decode step is hundreds of small kernels, and launching them costs more than running
them. The model's modules already call the GPU kernels on CUDA tensors (engine/ops.py); this
runner adds what a graph needs: the step reads its inputs from static buffers, so it is captured
once per batch-size bucket (graphs.GraphedStep) and replayed. Rows past the real batch decode a
dummy token with seq_len 0 and write their latent to a scratch slot that no sequence owns. At
load it folds each layer's shared expert into its routed experts (one fused MoE call per layer).

Prefill runs eagerly, chunk by chunk: short chunks as paged decode queries, longer ones expanded
through SDPA (cuda/attention.py).

Off CUDA the same code runs on CPU tensors: the ops run their PyTorch bodies, and GraphedStep runs
the padded step eagerly. That is how the tests check this path against the CPU engine
(LLM(..., kernel_path=True)); only graph capture and replay need a GPU.
"""

from __future__ import annotations

import torch
from torch import nn

from glmcode.engine.cuda.attention import ExpandedContext, PagedBatch
from glmcode.engine.cuda.graphs import DEFAULT_BUCKETS, GraphedStep
from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import KVBProjection
from glmcode.engine.model.moe import MoE, RoutedExperts
from glmcode.engine.sequence import Sequence
from glmcode.errors import UsageError

# A prefill chunk this short attends in the absorbed form, each token a decode query reading the
# cached context once. Longer chunks expand the context to per-head keys and values instead, which
# costs ~9 MFLOP per context token and layer whatever the chunk size; on an H100/H200 the two
# meet at roughly 60-80 queries.
ABSORBED_PREFILL_MAX_TOKENS = 64


class CudaRunner:
    """Prefill chunks and batched decode steps of the model through the GPU kernels."""

    def __init__(self, model: GlmMoeLite, kv_cache: KVCache, *, max_batch: int, max_context: int, scratch_slot: int):
        check_plain_weights(model)
        if kv_cache.data.is_cuda:
            check_triton_dims(model.config.kv_lora_rank, model.config.qk_rope_head_dim)
        self.model, self.kv_cache = model, kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.data.device
        for layer in model.model.layers:
            if isinstance(layer.mlp, MoE):
                layer.mlp.fold_shared_expert()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the replaced expert tensors: cached blocks too small for reuse
        self.graphed = GraphedStep(
            self._decode_step,
            self._static_decode_inputs(max_batch, -(-max_context // self.block_size), scratch_slot),
            pad_values={"write_slots": scratch_slot},
            buckets=batch_buckets(max_batch),
        )
        self.use_graphs = self.device.type == "cuda"

    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Runs positions [start, end) of a sequence; returns their final-normed hidden states."""
        num_tokens = end - start
        block_table = self._int_tensor(seq.block_table[: -(-end // self.block_size)], torch.int32)
        positions = torch.arange(start, end, device=self.device)
        write_slots = self._int_tensor(self.kv_cache.slots(seq, start, end))
        if num_tokens <= ABSORBED_PREFILL_MAX_TOKENS:
            seq_lens = torch.arange(start + 1, end + 1, dtype=torch.int32, device=self.device)
            batch = PagedBatch(positions, write_slots, block_table.expand(num_tokens, -1), seq_lens)
        else:
            batch = PagedBatch(positions, write_slots, context=ExpandedContext(block_table.long(), end))
        return self.model(self._int_tensor(seq.token_ids[start:end]), batch, self.kv_cache)

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feeds each sequence's last token; returns float32 logits [len(seqs), vocab]."""
        if self.use_graphs and not self.graphed.graphs:
            self.graphed.capture()
        return self.graphed(self.decode_inputs(seqs)).clone()  # replay reuses the output buffer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def decode_eager(self, seqs: list[Sequence]) -> torch.Tensor:
        """decode() without the graphs, on the same padded buffers (profiling, checks)."""
        return self.graphed.run_eager(self.decode_inputs(seqs)).clone()

    def decode_inputs(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        """Host tensors for one decode step; GraphedStep copies them into its static buffers."""
        size = self.block_size
        last = [len(s) - 1 for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return {
            "token_ids": torch.tensor([s.token_ids[-1] for s in seqs]),
            "positions": torch.tensor(last),
            "write_slots": torch.tensor([s.block_table[p // size] * size + p % size for s, p in zip(seqs, last)]),
            "block_tables": torch.tensor(tables, dtype=torch.int32),
            "seq_lens": torch.tensor([len(s) for s in seqs], dtype=torch.int32),
        }

    def _decode_step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph-captured step: no host syncs, every shape fixed by the bucket."""
        batch = PagedBatch(inputs["positions"], inputs["write_slots"], inputs["block_tables"], inputs["seq_lens"])
        return self.logits(self.model(inputs["token_ids"], batch, self.kv_cache))

    def _static_decode_inputs(self, max_batch: int, max_blocks: int, scratch_slot: int) -> dict[str, torch.Tensor]:
        """The static buffers, holding pad rows: token 0 at position 0, no context, scratch write."""
        zeros = dict(device=self.device, dtype=torch.long)
        return {
            "token_ids": torch.zeros(max_batch, **zeros),
            "positions": torch.zeros(max_batch, **zeros),
            "write_slots": torch.full((max_batch,), scratch_slot, **zeros),
            "block_tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(max_batch, dtype=torch.int32, device=self.device),
        }

    def _int_tensor(self, values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The captured batch sizes: the default buckets below max_batch, then max_batch itself."""
    return tuple(b for b in DEFAULT_BUCKETS if b < max_batch) + (max_batch,)


def check_triton_dims(latent_dim: int, rope_dim: int) -> None:
    """The Triton MLA kernel multiplies [heads, dim] tiles with tl.dot: powers of two, at least 16."""
    for name, dim in (("kv_lora_rank", latent_dim), ("qk_rope_head_dim", rope_dim)):
        if dim < 16 or dim & (dim - 1):
            raise UsageError(f"{name} = {dim}: the CUDA kernel path needs a power of two >= 16")


def check_plain_weights(model: GlmMoeLite) -> None:
    """The kernel path multiplies plain weight tensors; quantized modules stay on the CPU path."""
    for name, module in model.named_modules():
        plain = (
            type(module) is KVBProjection if name.endswith(".kv_b_proj")
            else isinstance(module, nn.Linear) if name.endswith(("_proj", "lm_head"))
            else type(module) is RoutedExperts if name.endswith(".experts")
            else True
        )  # fmt: skip
        if not plain:
            raise UsageError(f"{name} holds quantized weights: quantized models run on the CPU path only")
