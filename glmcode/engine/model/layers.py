"""Building blocks shared by attention and the feed-forward layers.

Every projection is a plain bias-free `nn.Linear` called as `module(x)`, so a quantized module
with the same call signature can replace it after the weights are loaded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Linear):
    """A bias-free linear layer that takes the fast CPU kernel for few-row inputs."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear_forward(x, self.weight)


def linear(in_features: int, out_features: int) -> Linear:
    return Linear(in_features, out_features)


def linear_forward(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. Decode multiplies one or a few rows by big weights; on CPU, torch.mv and
    weight @ x.T run those 3-4x faster than F.linear (measured in bf16, torch 2.13)."""
    rows = x.numel() // x.shape[-1]
    if not x.is_cpu or rows > 32:
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        out = torch.mv(weight, flat[0])
    else:
        out = torch.mm(weight, flat.t()).t()
    return out.reshape(*x.shape[:-1], weight.shape[0])


class RMSNorm(nn.Module):
    """Normalizes in float32, casts back, then scales (the reference's order of operations)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are stored as one [2 * width, hidden] matrix."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.width = width
        self.gate_up_proj = linear(hidden_size, 2 * width)
        self.down_proj = linear(width, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(silu_and_mul(self.gate_up_proj(x)))


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


class Rotary:
    """Rotary position embedding on interleaved pairs (x[2i], x[2i+1]).

    The rotated pairs come out de-interleaved (all first elements, then all second elements),
    exactly as the reference does it. Queries and keys go through the same function, so q.k is
    unchanged by that permutation, and the cache stores keys in this layout.
    """

    def __init__(self, dim: int, theta: float):
        # Explicit device: the model is built under a meta-device context.
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim
        self.inv_freq = 1.0 / (theta**exponents)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of shape [T, dim / 2] for integer positions [T]."""
        inv_freq = self.inv_freq.to(positions.device)
        angles = positions[:, None].float() * inv_freq
        return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, ..., dim]; cos/sin: [T, dim / 2], broadcast over the middle dims."""
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1)
