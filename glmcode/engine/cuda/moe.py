"""The MoE on a GPU: which kernel a batch takes, and the grouping of (token, slot) pairs by expert.

Decode-sized batches go to the Triton fused MoE (triton_moe.py); bfloat16 prefill batches above
FUSED_MOE_MAX_TOKENS to two grouped GEMMs (torch._grouped_mm) where the GPU has them.
`moe_align_reference` is the PyTorch form of the Triton align kernel, and what it falls back to
for batches too big for its single program.
"""

from __future__ import annotations

import torch

from glmcode.engine import ops

# Above this many tokens (prefill) torch._grouped_mm takes over from the Triton fused MoE.
FUSED_MOE_MAX_TOKENS = 64


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """ops.fused_moe on a GPU."""
    if x.shape[0] > FUSED_MOE_MAX_TOKENS and x.dtype == torch.bfloat16 and grouped_mm_available(x.device):
        return grouped_moe(x, w13, w2, topk_ids, topk_weights)
    from glmcode.engine.cuda import triton_moe

    return triton_moe.fused_moe(x, w13, w2, topk_ids, topk_weights)


def moe_align_reference(
    topk_ids: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Group (token, slot) pairs by expert into blocks of `block_m` rows for the fused MoE kernels.

    Pairs are numbered p = token * k + slot. Returns
    - sorted_pair_ids [max_blocks * block_m] int32: each expert's pairs in ascending order, its
      segment padded to a multiple of block_m with the sentinel P = T * k;
    - block_expert [max_blocks] int32: the expert of each block, -1 for blocks past the end.
    max_blocks = moe_max_blocks(P, num_experts, block_m) depends only on shapes, so the buffers
    are static (CUDA-graph friendly).
    """
    flat_ids = topk_ids.reshape(-1).long()
    num_pairs = flat_ids.numel()
    max_blocks = moe_max_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    counts = expert_counts(flat_ids, num_experts)
    padded = (counts + block_m - 1) // block_m * block_m
    padded_start = torch.cumsum(padded, 0) - padded
    order = torch.sort(flat_ids, stable=True).indices
    sorted_ids = flat_ids[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    slot = padded_start[sorted_ids] + torch.arange(num_pairs, device=device) - first_of_expert[sorted_ids]
    sorted_pair_ids = torch.full((max_blocks * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pair_ids[slot] = order.to(torch.int32)
    block_start = torch.arange(max_blocks, device=device) * block_m
    padded_end = torch.cumsum(padded, 0)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_start < padded_end[-1], block_expert, -1)
    return sorted_pair_ids, block_expert.to(torch.int32)


def expert_counts(flat_ids: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Pairs per expert. Unlike torch.bincount this never syncs with the GPU (graph-capturable)."""
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat_ids.device)
    return counts.scatter_add_(0, flat_ids, torch.ones_like(flat_ids))


def moe_max_blocks(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Upper bound on the blocks moe_align can produce: every used expert may waste block_m - 1 rows."""
    return (num_pairs + min(num_pairs, num_experts) * (block_m - 1)) // block_m


def grouped_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Prefill MoE with two `torch._grouped_mm` calls over the pairs sorted by expert.

    Same contract as ops.fused_moe. Needs torch._grouped_mm (bf16 on sm90 CUDA; CPU in
    recent torch); see grouped_mm_available().
    """
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.sort(flat_ids, stable=True).indices
    tokens = order // topk_ids.shape[1]
    group_ends = torch.cumsum(expert_counts(flat_ids, num_experts), 0).to(torch.int32)
    gate_up = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=group_ends)
    expert_out = torch._grouped_mm(ops.silu_mul(gate_up), w2.transpose(1, 2), offs=group_ends)
    weights = topk_weights.reshape(-1)[order].float()
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    out.index_add_(0, tokens, expert_out.float() * weights[:, None])
    return out.to(x.dtype)


def grouped_mm_available(device: torch.device) -> bool:
    """torch._grouped_mm runs on sm90+ CUDA and on CPU in torch builds that ship it."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"
