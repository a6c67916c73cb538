"""Quantized latent KV caches: int8 with two scales per token (CPU), float8 with one (CUDA).

The cache itself (kv_cache.py) stores what these functions return and reads it back through them.
"""

from __future__ import annotations

import torch

FP8_E4M3_MAX = 448.0


def quantize_latent(latent: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize cached MLA latents ``[..., D]`` to int8 with two scales per token.

    The first ``split`` values (the normalized latent ``c_kv``) and the rest (the roped key
    ``k_pe``, not normalized) have different ranges, so each part gets its own symmetric scale.
    Returns ``(values int8 [..., D], scales float32 [..., 2])``.
    """
    parts = (latent[..., :split].float(), latent[..., split:].float())
    scales = torch.stack([p.abs().amax(dim=-1).clamp(min=1e-12) / 127.0 for p in parts], dim=-1)
    values = torch.cat(
        [torch.round(p / scales[..., i : i + 1]).clamp(-127, 127) for i, p in enumerate(parts)], dim=-1
    )
    return values.to(torch.int8), scales


def dequantize_latent(
    values: torch.Tensor, scales: torch.Tensor, split: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    latent = values[..., :split].to(dtype) * scales[..., 0:1].to(dtype)
    rope = values[..., split:].to(dtype) * scales[..., 1:2].to(dtype)
    return torch.cat([latent, rope], dim=-1)


def quantize_fp8_per_token(rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cache rows [N, D] -> (float8_e4m3fn rows, float32 scale per row) with amax mapped to 448."""
    amax = rows.float().abs().amax(dim=-1).clamp(min=1e-12)
    scales = amax / FP8_E4M3_MAX
    quantized = (rows.float() / scales[:, None]).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return quantized.to(torch.float8_e4m3fn), scales
