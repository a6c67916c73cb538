"""The routed experts of one MoE layer with quantized weights."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine import ops
from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.kernels import in_huge_pages
from glmcode.engine.quant import linear
from glmcode.engine.quant.formats import Int4Weight, QuantizedWeight


class _RoutedExperts(nn.Module):
    """``forward(x [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H]``: the weighted sum of
    each token's experts, grouped by expert (ops.moe_by_expert), as the float experts do."""

    num_experts: int

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        return ops.moe_by_expert(x, topk_ids, topk_weights, self.expert)


class QuantizedExperts(_RoutedExperts):
    """The routed experts of one MoE layer with quantized weights, one module per expert."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError("gate_up and down need one module per expert")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[index](x).chunk(2, dim=-1)
        return self.down[index](F.silu(gate) * up)


class StackedInt4Experts(_RoutedExperts):
    """int4 routed experts stacked per layer for our CPU kernels.

    A decoded token runs through all of its experts in one kernel call (one activation
    quantization, one parallel pass over every selected expert's tiles); so does a chunk of
    tokens, grouped by expert (each active expert one many-row product per weight, on AMX tiles
    where the CPU has them).
    """

    def __init__(self, gate_up: list[Int4Weight], down: list[Int4Weight], *, dtype: torch.dtype):
        super().__init__()
        self.num_experts = len(gate_up)
        self.compute_dtype = dtype
        self.hidden_size = gate_up[0].shape[1]
        self.up_group, self.down_group = gate_up[0].group_size, down[0].group_size
        for prefix, weights in (("up", gate_up), ("down", down)):
            packs = [cpu_kernels.pack_int4(w.nibbles, w.scales, w.zeros) for w in weights]
            for i, part in enumerate(("packed", "scales", "zeros")):
                self.register_buffer(f"{prefix}_{part}", in_huge_pages(torch.stack([p[i] for p in packs])))

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] > 1:  # a chunk, grouped by expert in one kernel call
            y = cpu_kernels.ops().int4_moe_grouped(
                x.to(self.compute_dtype), topk_ids, topk_weights, self.up_packed, self.up_scales, self.up_zeros,
                self.up_group, self.down_packed, self.down_scales, self.down_zeros, self.down_group,
            )
            return y.to(x.dtype)
        # one token: all of its experts in one kernel call
        y = cpu_kernels.ops().int4_moe_token(
            x.to(self.compute_dtype), topk_ids[0], topk_weights[0], self.up_packed, self.up_scales, self.up_zeros,
            self.up_group, self.down_packed, self.down_scales, self.down_zeros, self.down_group,
        )
        return y[:, : self.hidden_size].to(x.dtype)


def quantized_experts(
    gate_up: list[QuantizedWeight], down: list[QuantizedWeight], *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> _RoutedExperts:
    """One layer's routed experts in the fastest form this machine runs them in."""
    device = torch.device(device)
    stackable = all(isinstance(w, Int4Weight) for w in gate_up + down) and linear.select_kernel(4, device) == "glmcode"
    if stackable and len({w.group_size for w in gate_up}) == 1 and len({w.group_size for w in down}) == 1:
        return StackedInt4Experts(gate_up, down, dtype=dtype)
    return QuantizedExperts(
        [linear.quantized_linear(w, dtype=dtype, device=device) for w in gate_up],
        [linear.quantized_linear(w, dtype=dtype, device=device) for w in down],
    )
