"""Triton kernels for the small per-token ops: RMSNorm (with the residual add), rope, SiLU*mul,
and the MoE routing that follows the router's GEMV (sigmoid, biased top-k, renormalize, scale).

Each replaces a handful of PyTorch launches (casts, pow, mean, rsqrt, mul...) by one; at batch 1
decode that launch count, not the bytes, is what costs. One program per row.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr, residual_ptr, weight_ptr, out_ptr, summed_ptr,
    dim, eps,
    stride_x, stride_r, stride_o, stride_s,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        x += tl.load(residual_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        x = x.to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * stride_s + cols, x, mask=mask)
        x = x.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * inv_rms).to(out_ptr.dtype.element_ty).to(tl.float32)  # rounded as ops.rms_norm does
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, (normed * weight).to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    num_heads,
    stride_q_t, stride_q_h, stride_k_t, stride_cs,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pairs = tl.arange(0, HALF)
    position = tl.load(positions_ptr + token).to(tl.int64)
    cos = tl.load(cos_sin_ptr + position * stride_cs + pairs)
    sin = tl.load(cos_sin_ptr + position * stride_cs + HALF + pairs)
    even_out, odd_out = pairs, HALF + pairs  # de-interleaved, as ops.rope_ lays them out

    heads = tl.arange(0, BLOCK_H)
    q_rows = q_ptr + token * stride_q_t + heads[:, None] * stride_q_h
    head_mask = (heads < num_heads)[:, None]
    q_even = tl.load(q_rows + 2 * pairs[None, :], mask=head_mask, other=0.0).to(tl.float32)
    q_odd = tl.load(q_rows + 2 * pairs[None, :] + 1, mask=head_mask, other=0.0).to(tl.float32)
    k_row = k_ptr + token * stride_k_t
    k_even = tl.load(k_row + 2 * pairs).to(tl.float32)
    k_odd = tl.load(k_row + 2 * pairs + 1).to(tl.float32)
    tl.debug_barrier()  # in place: every element is read before any is overwritten

    q_type = q_ptr.dtype.element_ty
    tl.store(q_rows + even_out[None, :], (q_even * cos[None, :] - q_odd * sin[None, :]).to(q_type), mask=head_mask)
    tl.store(q_rows + odd_out[None, :], (q_odd * cos[None, :] + q_even * sin[None, :]).to(q_type), mask=head_mask)
    k_type = k_ptr.dtype.element_ty
    tl.store(k_row + even_out, (k_even * cos - k_odd * sin).to(k_type))
    tl.store(k_row + odd_out, (k_odd * cos + k_even * sin).to(k_type))


@triton.jit
def _silu_mul_kernel(
    gate_up_ptr, out_ptr,
    inter_size,
    stride_in, stride_out,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter_size
    gate = tl.load(gate_up_ptr + row * stride_in + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + row * stride_in + inter_size + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(out_ptr + row * stride_out + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _route_topk_kernel(
    logits_ptr, bias_ptr, ids_ptr, weights_ptr,
    num_experts, scaling, shared_expert_id,
    stride_l, stride_i, stride_w,
    TOP_K: tl.constexpr,
    WIDTH: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_SLOTS: tl.constexpr,
    NORMALIZE: tl.constexpr,
    HAS_SHARED: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    experts = tl.arange(0, BLOCK_E)
    valid = experts < num_experts
    logits = tl.load(logits_ptr + row * stride_l + experts, mask=valid, other=0.0).to(tl.float32)
    scores = 1.0 / (1.0 + tl.exp(-logits))
    choice = tl.where(valid, scores + tl.load(bias_ptr + experts, mask=valid, other=0.0), float("-inf"))
    slots = tl.arange(0, BLOCK_SLOTS)
    picked_ids = tl.zeros([BLOCK_SLOTS], dtype=tl.int32)
    picked = tl.zeros([BLOCK_SLOTS], dtype=tl.float32)
    for slot in tl.static_range(TOP_K):  # k rounds of argmax; k is 4 for GLM
        best = tl.argmax(choice, axis=0)
        picked_ids = tl.where(slots == slot, best, picked_ids)
        picked = tl.where(slots == slot, tl.sum(tl.where(experts == best, scores, 0.0), axis=0), picked)
        choice = tl.where(experts == best, float("-inf"), choice)
    if NORMALIZE:
        picked = picked / (tl.sum(picked, axis=0) + 1e-20)
    picked = picked * scaling
    if HAS_SHARED:
        picked_ids = tl.where(slots == TOP_K, shared_expert_id, picked_ids)
        picked = tl.where(slots == TOP_K, 1.0, picked)
    used = slots < WIDTH
    tl.store(ids_ptr + row * stride_i + slots, picked_ids, mask=used)
    tl.store(weights_ptr + row * stride_w + slots, picked, mask=used)


def _rows(x: torch.Tensor) -> torch.Tensor:
    if x.stride(-1) != 1:
        raise ValueError("the last dim must be contiguous")
    return x.reshape(-1, x.shape[-1])


def _norm(x, residual, weight, eps):
    x_rows = _rows(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if residual is not None else out
    residual_rows = _rows(residual) if residual is not None else x_rows
    out_rows, summed_rows = out.view(-1, x.shape[-1]), summed.view(-1, x.shape[-1])
    dim = x.shape[-1]
    _rms_norm_kernel[(x_rows.shape[0],)](
        x_rows, residual_rows, weight, out_rows, summed_rows,
        dim, eps,
        x_rows.stride(0), residual_rows.stride(0), out_rows.stride(0), summed_rows.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK_D=triton.next_power_of_2(dim),
        num_warps=4 if dim <= 2048 else 8,
    )
    return out, summed


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Triton version of ops.rms_norm (x [..., D], weight [D])."""
    return _norm(x, None, weight, eps)[0]


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ops.add_rms_norm: (rms_norm(x + residual), x + residual)."""
    return _norm(x, residual, weight, eps)


def rope_(q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate q_pe [T, N, R] and k_pe [T, R] in place (strided views are fine; last dim contiguous).

    Same rotation and layout as ops.rope_; cos_sin float32 [max_positions, R] (Rotary.cos_sin).
    """
    num_tokens, num_heads, rope_dim = q_pe.shape
    if q_pe.stride(-1) != 1 or k_pe.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q_pe, k_pe and cos_sin must be contiguous in their last dim")
    if num_tokens == 0:
        return
    _rope_kernel[(num_tokens,)](
        q_pe, k_pe, positions, cos_sin,
        num_heads,
        q_pe.stride(0), q_pe.stride(1), k_pe.stride(0), cos_sin.stride(0),
        HALF=rope_dim // 2,
        BLOCK_H=triton.next_power_of_2(num_heads),
        num_warps=4,
    )


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Triton version of ops.silu_mul: [..., 2I] -> silu(gate) * up, [..., I]."""
    rows = _rows(gate_up)
    inter_size = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inter_size, dtype=gate_up.dtype, device=gate_up.device)
    out_rows = out.view(-1, inter_size)
    block = min(1024, triton.next_power_of_2(inter_size))
    _silu_mul_kernel[(rows.shape[0], triton.cdiv(inter_size, block))](
        rows, out_rows, inter_size, rows.stride(0), out_rows.stride(0), BLOCK=block, num_warps=4,
    )
    return out


def route_topk(
    logits: torch.Tensor,
    correction_bias: torch.Tensor,
    top_k: int,
    scaling: float,
    normalize: bool,
    shared_expert_id: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton version of ops.route_topk, one program per token (logits [T, E])."""
    num_tokens, num_experts = logits.shape
    if logits.stride(-1) != 1:
        raise ValueError("the last dim of logits must be contiguous")
    width = top_k + (shared_expert_id is not None)
    expert_ids = torch.empty(num_tokens, width, dtype=torch.int32, device=logits.device)
    weights = torch.empty(num_tokens, width, dtype=torch.float32, device=logits.device)
    if num_tokens == 0:
        return expert_ids, weights
    _route_topk_kernel[(num_tokens,)](
        logits, correction_bias.float(), expert_ids, weights,
        num_experts, scaling, -1 if shared_expert_id is None else shared_expert_id,
        logits.stride(0), expert_ids.stride(0), weights.stride(0),
        TOP_K=top_k,
        WIDTH=width,
        BLOCK_E=triton.next_power_of_2(num_experts),
        BLOCK_SLOTS=triton.next_power_of_2(width),
        NORMALIZE=normalize,
        HAS_SHARED=shared_expert_id is not None,
        num_warps=1 if num_experts <= 128 else 4,
    )
    return expert_ids, weights
