"""Plain-PyTorch versions of every GPU kernel: the CPU path, the fallback, and the test oracle.

Each function here has the same tensor contract as its Triton twin (see the package docstring).
They favour clarity over speed, but stay vectorised where that costs nothing.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from glmcode.engine.quant.latent_cache import FP8_E4M3_MAX


# ---------------------------------------------------------------------------------------------
# Absorbed MLA decode over the paged latent cache
# ---------------------------------------------------------------------------------------------


def gather_sequence_rows(
    cache: torch.Tensor, block_table: torch.Tensor, seq_len: int
) -> torch.Tensor:
    """The first `seq_len` rows of one sequence from a paged `[num_blocks, block_size, ...]` cache."""
    block_size = cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    pages = cache[block_table[:num_blocks].long()]
    return pages.reshape(num_blocks * block_size, *cache.shape[2:])[:seq_len]


def dequantize_rows(
    rows: torch.Tensor, row_scales: torch.Tensor | None
) -> torch.Tensor:
    """float32 view of cache rows; `row_scales` is a scalar (per-tensor) or one value per row."""
    values = rows.float()
    if row_scales is None:
        return values
    return values * row_scales.float().reshape(-1, 1) if row_scales.numel() > 1 else values * row_scales.float()


def mla_decode_reference(
    q_nope_absorbed: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA decode: one query token per sequence against its cached latents.

    q_nope_absorbed [B, H, Dl] (query already multiplied by W_UK), q_pe [B, H, Dr] (roped),
    kv_cache [num_blocks, block_size, Dl + Dr] (latent ‖ roped k_pe), block_tables [B, max_blocks]
    int32, seq_lens [B] int32 (tokens to attend to, including the current one, already written),
    kv_scale: None, a one-element tensor (per-tensor fp8 scale) or [num_blocks, block_size]
    (per-token scales). Returns o_latent [B, H, Dl] in the query dtype; softmax and sums in fp32.
    """
    batch, _, latent_dim = q_nope_absorbed.shape
    out = torch.zeros_like(q_nope_absorbed)
    per_token_scale = kv_scale is not None and kv_scale.numel() > 1
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        rows = gather_sequence_rows(kv_cache, block_tables[b], seq_len)
        scales = kv_scale
        if per_token_scale:
            scales = gather_sequence_rows(kv_scale, block_tables[b], seq_len)
        rows = dequantize_rows(rows, scales)
        latent, k_pe = rows[:, :latent_dim], rows[:, latent_dim:]
        scores = (q_nope_absorbed[b].float() @ latent.T + q_pe[b].float() @ k_pe.T) * scale
        out[b] = (torch.softmax(scores, dim=-1) @ latent).to(out.dtype)
    return out


def quantize_fp8_per_tensor(rows: torch.Tensor, scale: float) -> torch.Tensor:
    """Cache rows -> float8_e4m3fn with one fixed scale (values / scale, saturated at 448)."""
    return (rows.float() / scale).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


# ---------------------------------------------------------------------------------------------
# MoE over stacked experts
# ---------------------------------------------------------------------------------------------


def silu_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]; computed in fp32, returned in the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


def fused_moe_reference(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
) -> torch.Tensor:
    """Weighted sum of the selected experts' SwiGLU MLPs, looping over the experts in use.

    x [T, H], w13 [E, 2I, H] (gate rows then up rows), w2 [E, H, I], topk_ids [T, k] (any int
    dtype), topk_weights [T, k] (already normalised and scaled). Returns [T, H] in x's dtype; the
    weighted sum is accumulated in fp32.
    """
    out = torch.zeros(x.shape[0], w2.shape[1], dtype=torch.float32, device=x.device)
    flat_ids = topk_ids.reshape(-1)
    flat_weights = topk_weights.reshape(-1).float()
    token_of_pair = torch.arange(flat_ids.numel(), device=x.device) // topk_ids.shape[1]
    for expert in flat_ids.unique().tolist():
        pairs = (flat_ids == expert).nonzero().squeeze(1)
        tokens = token_of_pair[pairs]
        hidden = silu_mul_reference(x[tokens] @ w13[expert].T)
        expert_out = (hidden @ w2[expert].T).float()
        out.index_add_(0, tokens, expert_out * flat_weights[pairs, None])
    return out.to(x.dtype)


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

    Same contract as fused_moe_reference. Needs torch._grouped_mm (bf16 on sm90 CUDA; CPU in
    recent torch); see grouped_mm_available().
    """
    num_experts = w13.shape[0]
    flat_ids = topk_ids.reshape(-1).long()
    order = torch.sort(flat_ids, stable=True).indices
    tokens = order // topk_ids.shape[1]
    group_ends = torch.cumsum(expert_counts(flat_ids, num_experts), 0).to(torch.int32)
    gate_up = torch._grouped_mm(x[tokens], w13.transpose(1, 2), offs=group_ends)
    expert_out = torch._grouped_mm(silu_mul_reference(gate_up), w2.transpose(1, 2), offs=group_ends)
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


def stack_shared_expert(
    w13: torch.Tensor, w2: torch.Tensor, shared_w13: torch.Tensor, shared_w2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """[E, 2I, H], [E, H, I] plus the shared expert's [2I, H], [H, I] -> stacks of E + 1 experts.

    The shared expert becomes expert E. Done once at load; the engine can then point its
    modules' parameters at views of these stacks so the weights are not held twice.
    """
    return torch.cat([w13, shared_w13[None]]), torch.cat([w2, shared_w2[None]])


def with_shared_expert(
    topk_ids: torch.Tensor, topk_weights: torch.Tensor, shared_expert_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared expert as an always-selected extra slot with weight 1.

    For w13/w2 stacks that hold the shared expert at index `shared_expert_id` (usually E).
    """
    tokens = topk_ids.shape[0]
    shared_ids = torch.full((tokens, 1), shared_expert_id, dtype=topk_ids.dtype, device=topk_ids.device)
    shared_weights = torch.ones((tokens, 1), dtype=topk_weights.dtype, device=topk_weights.device)
    return torch.cat([topk_ids, shared_ids], dim=1), torch.cat([topk_weights, shared_weights], dim=1)


def route_topk_reference(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    scaling: float,
    normalize: bool,
    shared_expert_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sigmoid top-k routing from router logits [T, E] float32 (one expert group).

    The correction bias only steers which experts are picked; the weights are the picked
    experts' sigmoid scores, renormalized to sum to 1 (normalize), times `scaling`. With
    shared_expert_id, an always-selected slot of weight 1 is appended (see with_shared_expert).
    Returns (expert ids [T, k(+1)] int32, weights [T, k(+1)] float32).
    """
    scores = logits.float().sigmoid()
    expert_ids = torch.topk(scores + correction_bias.float(), top_k, dim=-1).indices
    weights = scores.gather(1, expert_ids)
    if normalize:
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    expert_ids, weights = expert_ids.to(torch.int32), weights * scaling
    if shared_expert_id is not None:
        expert_ids, weights = with_shared_expert(expert_ids, weights, shared_expert_id)
    return expert_ids, weights


# ---------------------------------------------------------------------------------------------
# Small fused ops
# ---------------------------------------------------------------------------------------------


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim.

    The order of the HF reference and the engine: normalise in fp32, cast to x's dtype, then
    multiply by the weight.
    """
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


def add_rms_norm_reference(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block boundary in one step."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm_reference(summed, weight, eps), summed


def rope_cos_sin(max_positions: int, rope_dim: int, theta: float, device=None) -> torch.Tensor:
    """[max_positions, rope_dim] float32 table: cos of the rope_dim/2 frequencies, then their sin."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rope_dim, 2, dtype=torch.float64, device=device) / rope_dim)
    angles = torch.arange(max_positions, dtype=torch.float64, device=device)[:, None] * inv_freq[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def rope_interleaved_reference(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor, deinterleave: bool = False
) -> torch.Tensor:
    """Rotate adjacent pairs (x[2i], x[2i+1]) of the last dim by position * inv_freq[i].

    x [T, ..., R], positions [T], cos_sin from rope_cos_sin. With deinterleave=False the pairs
    stay in place (GPT-J / vLLM layout); with True the output is [rotated evens ‖ rotated odds]
    (the HF transformers layout). Either is fine as long as q and k use the same one.
    """
    half = x.shape[-1] // 2
    table = cos_sin[positions.long()].reshape(x.shape[0], *([1] * (x.dim() - 2)), 2 * half)
    cos, sin = table[..., :half], table[..., half:]
    even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
    new_even = even * cos - odd * sin
    new_odd = odd * cos + even * sin
    if deinterleave:
        rotated = torch.cat([new_even, new_odd], dim=-1)
    else:
        rotated = torch.stack([new_even, new_odd], dim=-1).flatten(-2)
    return rotated.to(x.dtype)
