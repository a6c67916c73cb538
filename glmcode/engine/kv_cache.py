"""The paged latent KV cache: per layer, one slot of 576 values per token, in fixed-size blocks.

MLA caches only the normalized 512-d latent and the roped 64-d key every head shares. A slot is
addressed as `block * block_size + offset`; which blocks a sequence owns is the block manager's
business (`block_manager.py`). Three storage kinds:

- the model dtype (the default);
- int8 with two float32 scales per token (`kv_cache_dtype="int8"`, CPU): about half the memory
  of bfloat16, for contexts that would not fit otherwise;
- float8_e4m3fn with one float32 scale per token (`kv_cache_dtype="fp8"`, the CUDA path).

`KVCache.layers[i]` is one layer's view; attention writes new latents through it and reads them
back in the model dtype, so only the piece being read is ever widened.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.quant.latent_cache import dequantize_latent, quantize_fp8_per_token, quantize_latent
from glmcode.engine.sequence import Sequence
from glmcode.errors import UsageError

CPU_KV_MEMORY_FRACTION = 0.3  # of the memory still available after the weights are loaded
GPU_KV_MEMORY_FRACTION = 0.85  # of the device memory still free after the weights are loaded


@dataclass(frozen=True)
class KVSpan:
    """A run of consecutive cache slots holding consecutive positions of one sequence."""

    slot: int  # first slot in the layer's flat [num_blocks * block_size] cache
    length: int


class LayerCache:
    """One layer's slots: `flat` [slots, 576] for writes and reads, `paged` [blocks, block_size, 576]."""

    def __init__(self, values: torch.Tensor, scales: torch.Tensor | None, block_size: int, compute_dtype: torch.dtype, split: int):
        self.flat = values
        self.scales = scales  # int8: [slots, 2]; fp8: [slots]; None for the model dtype
        self.paged = values.view(-1, block_size, values.shape[-1])
        self.paged_scales = None if scales is None or scales.dim() != 1 else scales.view(-1, block_size)
        self.compute_dtype = compute_dtype
        self.split = split  # latent | rope boundary (int8 scales each part on its own)

    @property
    def device(self) -> torch.device:
        return self.flat.device

    def write(self, slots: torch.Tensor, rows: torch.Tensor) -> None:
        """Store the latents `rows` [T, 576] at `slots` [T]."""
        if self.scales is None:
            self.flat.index_copy_(0, slots, rows.to(self.flat.dtype))
        elif self.flat.dtype == torch.int8:
            values, scales = quantize_latent(rows, self.split)
            self.flat.index_copy_(0, slots, values)
            self.scales.index_copy_(0, slots, scales)
        else:
            values, scales = quantize_fp8_per_token(rows)
            # index_copy_ has no float8 kernels; the bytes are the same.
            self.flat.view(torch.uint8).index_copy_(0, slots, values.view(torch.uint8))
            self.scales.index_copy_(0, slots, scales)

    def read(self, start: int, stop: int) -> torch.Tensor:
        """Slots [start, stop) in the compute dtype."""
        if self.scales is None:
            return self.flat[start:stop].to(self.compute_dtype)
        if self.flat.dtype == torch.int8:
            return dequantize_latent(self.flat[start:stop], self.scales[start:stop], self.split, self.compute_dtype)
        return (self.flat[start:stop].float() * self.scales[start:stop, None]).to(self.compute_dtype)

    def gather(self, block_table: torch.Tensor, length: int) -> torch.Tensor:
        """The first `length` cached rows of a sequence; float32 for a quantized cache."""
        rows = self.paged[block_table].flatten(0, 1)[:length]
        if self.scales is None:
            return rows
        if self.flat.dtype == torch.int8:
            scales = self.scales.view(-1, self.paged.shape[1], 2)[block_table].flatten(0, 1)[:length]
            return dequantize_latent(rows, scales, self.split)
        return rows.float() * self.paged_scales[block_table].flatten()[:length, None]


class KVCache:
    """Latents of all layers: `data` [num_layers, num_blocks * block_size, 576]."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device | str, compute_dtype: torch.dtype | None = None):  # fmt: skip
        """dtype: the storage dtype (see EngineOptions.storage_dtype); compute_dtype: what reads return."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.dtype = dtype
        slots = num_blocks * block_size
        shape = (config.num_hidden_layers, slots, config.kv_cache_dim)
        # Zeros, not garbage: decode reads whole blocks, and the masked tail of a sequence's
        # last block must hold finite values (0 * NaN would poison the attention output).
        self.data = torch.zeros(shape, dtype=dtype, device=device)
        self.scales = None
        if dtype == torch.int8:
            self.scales = torch.zeros(*shape[:2], 2, dtype=torch.float32, device=device)
        elif dtype == torch.float8_e4m3fn:
            self.scales = torch.zeros(shape[:2], dtype=torch.float32, device=device)
        compute_dtype = compute_dtype or (dtype if dtype.is_floating_point and dtype.itemsize > 1 else torch.float32)
        self.compute_dtype = compute_dtype
        self.layers = [
            LayerCache(self.data[i], None if self.scales is None else self.scales[i], block_size, compute_dtype,
                       config.kv_lora_rank)  # fmt: skip
            for i in range(config.num_hidden_layers)
        ]

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
        per_token = config.kv_cache_dim * dtype.itemsize
        if dtype == torch.int8:
            per_token += 2 * 4  # its two scales
        elif dtype == torch.float8_e4m3fn:
            per_token += 4  # its scale
        return config.num_hidden_layers * block_size * per_token

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of a sequence."""
        size, table = self.block_size, seq.block_table
        return [table[pos // size] * size + pos % size for pos in range(start, end)]

    def spans(self, seq: Sequence, end: int, whole_blocks: bool = False) -> list[KVSpan]:
        """Positions [0, end) of a sequence as runs of consecutive slots (few when blocks are).

        whole_blocks: extend the last run to the end of its block. Attention masks the extra
        slots, and the matrix shapes then change once per block instead of once per token
        (on CPU each new shape costs a kernel compilation of several milliseconds).
        """
        size = self.block_size
        if whole_blocks:
            end = (end + size - 1) // size * size
        spans: list[KVSpan] = []
        for index in range((end + size - 1) // size):
            slot = seq.block_table[index] * size
            length = min(size, end - index * size)
            last = spans[-1] if spans else None
            if last is not None and last.slot + last.length == slot:
                spans[-1] = KVSpan(last.slot, last.length + length)
            else:
                spans.append(KVSpan(slot, length))
        return spans


def blocks_for_budget(config: ModelConfig, block_size: int, dtype: torch.dtype, budget: int) -> int:
    """Blocks for the model's whole context, or as many as `budget` bytes hold."""
    per_block = KVCache.bytes_per_block(config, block_size, dtype)
    full_context = config.max_position_embeddings + block_size - 1
    wanted = (full_context + block_size - 1) // block_size
    num_blocks = min(wanted, budget // per_block)
    if num_blocks < 1:
        raise UsageError(f"kv_cache_memory of {budget} bytes holds no block of {per_block} bytes")
    return num_blocks


def attention_dtype(model_dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the cache is read in, so the dtype attention multiplies in: the model's, except
    bfloat16 on a CPU where torch has no oneDNN bfloat16 matmul (AVX2 only, say), whose fallback
    products ran 13-27x slower than float32 ones there, conversion included (an AMD EPYC Milan)."""
    if model_dtype == torch.bfloat16 and device.type == "cpu" and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.float32
    return model_dtype


def default_budget(device: torch.device) -> int:
    """KV cache bytes when the caller names none: a share of the memory left after the weights."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free * GPU_KV_MEMORY_FRACTION)
    return int(available_memory() * CPU_KV_MEMORY_FRACTION)


def available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
