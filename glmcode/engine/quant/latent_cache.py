"""The int8 latent KV cache: MLA latents stored as int8 with two scales per token."""

from __future__ import annotations

import torch


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


class Int8LatentCache:
    """One layer's latent cache in int8 (two scales per token); reads come back dequantized.

    Stands in for the engine's ``[slots, 576]`` tensor: attention writes with ``index_copy_``
    and reads slices piece by piece, so only one piece is ever widened at a time. About half
    the memory of a bfloat16 cache, for contexts that would not fit otherwise.
    """

    def __init__(self, slots: int, dim: int, split: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.values = torch.zeros(slots, dim, dtype=torch.int8, device=device)
        self.scales = torch.zeros(slots, 2, dtype=torch.float32, device=device)
        self.split, self.dtype = split, dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def index_copy_(self, dim: int, index: torch.Tensor, latents: torch.Tensor) -> "Int8LatentCache":
        values, scales = quantize_latent(latents, self.split)
        self.values.index_copy_(dim, index, values)
        self.scales.index_copy_(dim, index, scales)
        return self

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return dequantize_latent(self.values[rows], self.scales[rows], self.split, self.dtype)

    @staticmethod
    def bytes_per_token(dim: int) -> int:
        return dim + 2 * 4
