"""The engine's options, checked once, with the defaults that depend on the device filled in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from glmcode.errors import UsageError
from glmcode.options import KV_CACHE_DTYPES


@dataclass(frozen=True)
class EngineOptions:
    device: torch.device
    kernel_path: bool  # run prefill and decode through the GPU kernels (cuda/runner.py)
    kv_cache_memory: int | None  # bytes for the KV cache; None: a share of what is free
    kv_cache_dtype: str | None  # None (the model dtype), "int8" (CPU) or "fp8" (kernel path)
    block_size: int
    max_num_seqs: int
    enable_prefix_caching: bool
    prefill_chunk_tokens: int
    progress: bool
    disk_cache_dir: Path | None  # the prefix cache's disk tier (disk_cache.py); None: none
    disk_cache_budget: int | None  # bytes the disk tier may use; None: disk_cache.default_budget
    weights_cache_dir: Path | None  # where quantized CPU models are kept as built (weights/snapshot.py)

    @classmethod
    def resolve(
        cls,
        *,
        device: str | torch.device = "cpu",
        kernel_path: bool | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str | None = None,
        block_size: int | None = None,
        max_num_seqs: int = 8,
        enable_prefix_caching: bool = True,
        prefill_chunk_tokens: int | None = None,
        progress: bool = True,
        disk_cache_dir: str | Path | None = None,
        disk_cache_budget: int | None = None,
        weights_cache_dir: str | Path | None = None,
    ) -> EngineOptions:
        """kernel_path None means: on CUDA devices. True on a CPU runs the CUDA path's code through
        the kernels' PyTorch implementations, which is how the tests check it."""
        device = torch.device(device)
        kernel_path = device.type == "cuda" if kernel_path is None else kernel_path
        if kv_cache_dtype not in (None, *KV_CACHE_DTYPES):
            raise UsageError(f"unsupported kv_cache_dtype {kv_cache_dtype!r}; use int8 (CPU), fp8 (CUDA) or leave it unset")
        if kv_cache_dtype == "fp8" and not kernel_path:
            raise UsageError("kv_cache_dtype='fp8' needs the CUDA kernel path (device='cuda')")
        if kv_cache_dtype == "int8" and kernel_path:
            raise UsageError("kv_cache_dtype='int8' is for the CPU path; on CUDA use fp8")
        for name, value in (("block_size", block_size), ("max_num_seqs", max_num_seqs),
                            ("prefill_chunk_tokens", prefill_chunk_tokens), ("disk_cache_budget", disk_cache_budget)):
            if value is not None and value < 1:
                raise UsageError(f"{name} must be at least 1, got {value}")
        on_cpu = device.type == "cpu"
        return cls(
            device=device,
            kernel_path=kernel_path,
            kv_cache_memory=kv_cache_memory,
            kv_cache_dtype=kv_cache_dtype,
            block_size=block_size or (256 if on_cpu else 64),
            max_num_seqs=max_num_seqs,
            enable_prefix_caching=enable_prefix_caching,
            prefill_chunk_tokens=prefill_chunk_tokens or (512 if on_cpu else 4096),
            progress=progress,
            disk_cache_dir=Path(disk_cache_dir).expanduser() if disk_cache_dir is not None else None,
            disk_cache_budget=disk_cache_budget,
            weights_cache_dir=Path(weights_cache_dir).expanduser() if weights_cache_dir is not None else None,
        )

    def storage_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        """The dtype the KV cache stores latents in."""
        return {None: model_dtype, "int8": torch.int8, "fp8": torch.float8_e4m3fn}[self.kv_cache_dtype]
