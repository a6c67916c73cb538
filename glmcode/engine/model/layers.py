"""Building blocks shared by attention and the feed-forward layers.

Every projection is a plain bias-free `nn.Linear` called as `module(x)`, so a quantized module
with the same call signature can replace it after the weights are loaded. The arithmetic is in
engine/ops.py, which runs the GPU kernels on CUDA tensors.
"""

from __future__ import annotations

import torch
from torch import nn

from glmcode.engine import ops


class Linear(nn.Linear):
    """A bias-free linear layer that takes the fast CPU form for few-row inputs (ops.linear)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight)


def linear(in_features: int, out_features: int) -> Linear:
    return Linear(in_features, out_features)


class RMSNorm(nn.Module):
    """Normalizes in float32, casts back, then scales (the reference's order of operations).

    Called with a residual, it first adds it and returns (normed, sum): the pre-norm block
    boundary in one step.
    """

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps)
        return ops.add_rms_norm(x, residual, self.weight, self.eps)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate and up are stored as one [2 * width, hidden] matrix."""

    def __init__(self, hidden_size: int, width: int):
        super().__init__()
        self.width = width
        self.gate_up_proj = linear(hidden_size, 2 * width)
        self.down_proj = linear(width, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))


class Rotary:
    """Rotary position embedding: the float32 cos | sin table that ops.rope_ reads by position.

    The angles are computed as the reference implementation computes them (float32 positions
    times float32 inverse frequencies), so the tables agree to the bit.
    """

    def __init__(self, dim: int, theta: float, max_positions: int):
        # Explicit device: the model is built under a meta-device context.
        exponents = torch.arange(0, dim, 2, dtype=torch.float, device="cpu") / dim
        self.inv_freq = 1.0 / (theta**exponents)
        self.max_positions = max_positions
        self._table: torch.Tensor | None = None

    def cos_sin(self, device: torch.device) -> torch.Tensor:
        """The table [positions, dim] (cos of the dim/2 frequencies, then their sin) on `device`.
        Built once (CUDA graphs read it at a fixed address); see `reserve`."""
        if self._table is None or self._table.device != device:
            self.reserve(self.max_positions, device)
        return self._table

    def reserve(self, num_positions: int, device: torch.device) -> None:
        """Build the table for positions [0, num_positions): an engine whose context is shorter
        than the model's maximum needs no more."""
        angles = torch.arange(num_positions, dtype=torch.float, device=device)[:, None] * self.inv_freq.to(device)
        self._table = torch.cat([angles.cos(), angles.sin()], dim=-1).contiguous()
