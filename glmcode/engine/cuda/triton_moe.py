"""Triton fused MoE for small batches: align, gate/up + SiLU*mul, down + routing weight.

The (token, slot) pairs are grouped by expert into blocks of BLOCK_M rows (moe_align). Each
GEMM program then multiplies one block of gathered token rows by one tile of its expert's weights
with tl.dot, so an expert's weights are read once per block, however many tokens chose it. Four
launches per MoE layer: align (one program), gate/up (writes silu(gate) * up), down (scales each
pair's row by its routing weight), and a sum over the k slots. Every buffer size depends only on
shapes, so the call can be captured in a CUDA graph. The shared expert joins as one more expert
(ops.with_shared_expert).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from glmcode.engine.cuda.moe import moe_align_reference, moe_max_blocks
from glmcode.engine.cuda.triton_common import dot_dtype

# Above this many pairs the one-program align (quadratic in pairs) gives way to torch's sort.
MAX_TRITON_ALIGN_PAIRS = 1024
ALIGN_CHUNK = 64


@triton.jit
def _moe_align_kernel(
    topk_ids_ptr, sorted_pair_ids_ptr, block_expert_ptr,
    num_pairs, num_experts, max_blocks,
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    CHUNK: tl.constexpr,
):
    experts = tl.arange(0, BLOCK_E)
    lanes = tl.arange(0, CHUNK)

    counts = tl.zeros([BLOCK_E], dtype=tl.int32)
    for chunk_start in range(0, num_pairs, CHUNK):
        pairs = chunk_start + lanes
        ids = tl.load(topk_ids_ptr + pairs, mask=pairs < num_pairs, other=-1).to(tl.int32)
        counts += tl.sum((ids[None, :] == experts[:, None]).to(tl.int32), axis=1)
    padded = tl.cdiv(counts, BLOCK_M) * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    padded_start = padded_end - padded
    total = tl.sum(padded, axis=0)

    for chunk_start in range(0, max_blocks * BLOCK_M, CHUNK):
        slots = chunk_start + lanes
        tl.store(sorted_pair_ids_ptr + slots, num_pairs, mask=slots < max_blocks * BLOCK_M)
    for chunk_start in range(0, max_blocks, CHUNK):
        blocks = chunk_start + lanes
        first_row = blocks * BLOCK_M
        owner = tl.sum((padded_end[None, :] <= first_row[:, None]).to(tl.int32), axis=1)
        owner = tl.where(first_row < total, owner, -1)
        tl.store(block_expert_ptr + blocks, owner, mask=blocks < max_blocks)
    tl.debug_barrier()  # the sentinel fill above must land before the scatter below

    for chunk_start in range(0, num_pairs, CHUNK):
        pairs = chunk_start + lanes
        pair_mask = pairs < num_pairs
        ids = tl.load(topk_ids_ptr + pairs, mask=pair_mask, other=-1).to(tl.int32)
        rank = tl.zeros([CHUNK], dtype=tl.int32)
        for earlier_start in range(0, chunk_start + CHUNK, CHUNK):
            earlier = earlier_start + lanes
            earlier_ids = tl.load(topk_ids_ptr + earlier, mask=earlier < num_pairs, other=-2).to(tl.int32)
            same = (ids[:, None] == earlier_ids[None, :]) & (earlier[None, :] < pairs[:, None])
            rank += tl.sum(same.to(tl.int32), axis=1)
        segment = tl.sum(tl.where(ids[:, None] == experts[None, :], padded_start[None, :], 0), axis=1)
        tl.store(sorted_pair_ids_ptr + segment + rank, pairs, mask=pair_mask)


@triton.jit
def _moe_gate_up_kernel(
    x_ptr, w13_ptr, sorted_pair_ids_ptr, block_expert_ptr, hidden_ptr,
    num_pairs, top_k, hidden_size, inter_size,
    stride_x_t, stride_w_e, stride_w_n, stride_h_r,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + rows)
    row_valid = pairs < num_pairs
    tokens = tl.where(row_valid, pairs // top_k, 0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < inter_size
    weights = w13_ptr + expert.to(tl.int64) * stride_w_e

    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, hidden_size, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < hidden_size
        x = tl.load(x_ptr + tokens[:, None] * stride_x_t + ks[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0).to(DOT_DTYPE)
        w_mask = k_valid[:, None] & col_valid[None, :]
        w_gate = tl.load(weights + cols[None, :] * stride_w_n + ks[:, None], mask=w_mask, other=0.0)
        w_up = tl.load(weights + (cols[None, :] + inter_size) * stride_w_n + ks[:, None], mask=w_mask, other=0.0)
        acc_gate = tl.dot(x, w_gate.to(DOT_DTYPE), acc_gate)
        acc_up = tl.dot(x, w_up.to(DOT_DTYPE), acc_up)

    activated = acc_gate / (1.0 + tl.exp(-acc_gate)) * acc_up
    tl.store(hidden_ptr + rows[:, None] * stride_h_r + cols[None, :],
             activated.to(hidden_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def _moe_down_kernel(
    hidden_ptr, w2_ptr, sorted_pair_ids_ptr, block_expert_ptr, topk_weights_ptr, pair_out_ptr,
    num_pairs, hidden_size, inter_size,
    stride_h_r, stride_w_e, stride_w_n, stride_o_p,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    block = tl.program_id(0)
    expert = tl.load(block_expert_ptr + block)
    if expert < 0:
        return
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pair_ids_ptr + rows)
    row_valid = pairs < num_pairs
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_valid = cols < hidden_size
    weights = w2_ptr + expert.to(tl.int64) * stride_w_e

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, inter_size, BLOCK_K):
        ks = k_start + tl.arange(0, BLOCK_K)
        k_valid = ks < inter_size
        h = tl.load(hidden_ptr + rows[:, None] * stride_h_r + ks[None, :],
                    mask=row_valid[:, None] & k_valid[None, :], other=0.0).to(DOT_DTYPE)
        w = tl.load(weights + cols[None, :] * stride_w_n + ks[:, None],
                    mask=k_valid[:, None] & col_valid[None, :], other=0.0)
        acc = tl.dot(h, w.to(DOT_DTYPE), acc)

    routing = tl.load(topk_weights_ptr + pairs, mask=row_valid, other=0.0).to(tl.float32)
    acc = acc * routing[:, None]
    safe_pairs = tl.where(row_valid, pairs, 0)
    tl.store(pair_out_ptr + safe_pairs[:, None] * stride_o_p + cols[None, :],
             acc.to(pair_out_ptr.dtype.element_ty), mask=row_valid[:, None] & col_valid[None, :])


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of moe.moe_align_reference (one program) for up to 1024 pairs."""
    num_pairs = topk_ids.numel()
    if num_pairs > MAX_TRITON_ALIGN_PAIRS:
        return moe_align_reference(topk_ids, num_experts, block_m)
    max_blocks = moe_max_blocks(num_pairs, num_experts, block_m)
    device = topk_ids.device
    sorted_pair_ids = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    _moe_align_kernel[(1,)](
        topk_ids.reshape(-1), sorted_pair_ids, block_expert,
        num_pairs, num_experts, max_blocks,
        BLOCK_M=block_m,
        BLOCK_E=triton.next_power_of_2(num_experts),
        CHUNK=ALIGN_CHUNK,
        num_warps=4,
    )
    return sorted_pair_ids, block_expert


def default_block_m(num_tokens: int) -> int:
    return 16 if num_tokens <= 64 else 64


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    block_m: int | None = None,
    block_n: int = 64,
    block_k: int = 64,
    num_warps: int = 4,
    num_stages: int = 3,
) -> torch.Tensor:
    """Triton fused MoE; same contract as ops.fused_moe.

    x [T, H], w13 [E, 2I, H], w2 [E, H, I] (row-major, last dim contiguous), topk_ids [T, k],
    topk_weights [T, k]. Returns [T, H] in x's dtype.
    """
    num_tokens, hidden_size = x.shape
    num_experts, two_inter, _ = w13.shape
    inter_size = two_inter // 2
    top_k = topk_ids.shape[1]
    num_pairs = num_tokens * top_k
    if w2.shape != (num_experts, hidden_size, inter_size):
        raise ValueError(f"w2 has shape {tuple(w2.shape)}, expected {(num_experts, hidden_size, inter_size)}")
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 must be contiguous in their last dim")
    block_m = block_m or default_block_m(num_tokens)
    device = x.device
    operand_dtype = dot_dtype(device, x.dtype)

    sorted_pair_ids, block_expert = moe_align(topk_ids, num_experts, block_m)
    max_blocks = block_expert.numel()
    hidden = torch.empty(max_blocks * block_m, inter_size, dtype=x.dtype, device=device)
    _moe_gate_up_kernel[(max_blocks, triton.cdiv(inter_size, block_n))](
        x, w13, sorted_pair_ids, block_expert, hidden,
        num_pairs, top_k, hidden_size, inter_size,
        x.stride(0), w13.stride(0), w13.stride(1), hidden.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=operand_dtype,
        num_warps=num_warps, num_stages=num_stages,
    )
    pair_out = torch.empty(num_pairs, hidden_size, dtype=x.dtype, device=device)
    _moe_down_kernel[(max_blocks, triton.cdiv(hidden_size, block_n))](
        hidden, w2, sorted_pair_ids, block_expert, topk_weights.reshape(-1).contiguous(), pair_out,
        num_pairs, hidden_size, inter_size,
        hidden.stride(0), w2.stride(0), w2.stride(1), pair_out.stride(0),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=operand_dtype,
        num_warps=num_warps, num_stages=num_stages,
    )
    return pair_out.view(num_tokens, top_k, hidden_size).sum(dim=1)
