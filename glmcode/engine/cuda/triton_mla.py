"""Triton kernel: absorbed MLA decode over the paged latent cache, split over the context.

Stage 1 runs one program per (sequence, head block, context split). A head block covers all the
heads of a sequence (20 -> 32 rows), so each cached latent row is read once per split and is
shared by every head through tl.dot. The program walks its split in BLOCK_N-token tiles, looks up
each token's page in the block table (any page size works, tiles may straddle pages), and keeps an
online softmax. It writes a normalised partial output plus its log-sum-exp (base 2). Stage 2 merges
the splits. With one split, stage 1 writes the final output itself and stage 2 is skipped.

Split boundaries are computed on the device from seq_lens, and the split count depends only on
shapes, so a call can be captured in a CUDA graph and replayed with new lengths.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from glmcode.engine.cuda.triton_common import (
    dot_dtype,
    is_power_of_two,
    multiprocessor_count,
)

KV_SCALE_NONE, KV_SCALE_TENSOR, KV_SCALE_TOKEN = 0, 1, 2
MIN_TOKENS_PER_SPLIT = 256
MAX_SPLITS = 32
# The merge reads [splits, columns] tiles of this many floats: few enough to stay in registers.
MERGE_TILE_ELEMENTS = 8192


@triton.jit
def _split_len(seq_len, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tokens per split, whole tiles: a context shorter than NUM_SPLITS tiles leaves the last splits
    empty (the split count is fixed by the block table's capacity, not by the context). At least
    one tile, so an empty context (a graph bucket's pad row) has no split in use, not a zero divide."""
    return tl.cdiv(tl.maximum(tl.cdiv(seq_len, NUM_SPLITS), 1), BLOCK_N) * BLOCK_N


@triton.jit
def _mla_decode_split_kernel(
    q_nope_ptr, q_pe_ptr, kv_ptr, kv_scale_ptr, block_tables_ptr, seq_lens_ptr,
    partial_out_ptr, partial_lse_ptr, out_ptr,
    scale_log2,
    num_heads,
    stride_qn_b, stride_qn_h, stride_qp_b, stride_qp_h,
    stride_kv_block, stride_kv_token,
    stride_bt_b,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pl_b, stride_pl_h,
    stride_o_b, stride_o_h,
    PAGE_SIZE: tl.constexpr,
    LATENT_DIM: tl.constexpr,
    ROPE_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    KV_SCALE_MODE: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    split = tl.program_id(2)
    head_mask = heads < num_heads
    latent_cols = tl.arange(0, LATENT_DIM)
    rope_cols = tl.arange(0, ROPE_DIM)

    seq_len = tl.load(seq_lens_ptr + seq)
    split_len = _split_len(seq_len, NUM_SPLITS, BLOCK_N)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    q_nope = tl.load(
        q_nope_ptr + seq * stride_qn_b + heads[:, None] * stride_qn_h + latent_cols[None, :],
        mask=head_mask[:, None], other=0.0,
    ).to(DOT_DTYPE)
    q_pe = tl.load(
        q_pe_ptr + seq * stride_qp_b + heads[:, None] * stride_qp_h + rope_cols[None, :],
        mask=head_mask[:, None], other=0.0,
    ).to(DOT_DTYPE)

    if KV_SCALE_MODE == 1:  # a per-tensor scale multiplies every score and every value
        tensor_scale = tl.load(kv_scale_ptr)
        scale_log2 = scale_log2 * tensor_scale
    running_max = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, LATENT_DIM], dtype=tl.float32)

    for tile_start in range(start, end, BLOCK_N):
        positions = tile_start + tl.arange(0, BLOCK_N)
        valid = positions < end
        pages = tl.load(block_tables_ptr + seq * stride_bt_b + positions // PAGE_SIZE, mask=valid, other=0)
        slots = positions % PAGE_SIZE
        rows = pages.to(tl.int64) * stride_kv_block + slots * stride_kv_token
        latent = tl.load(kv_ptr + rows[:, None] + latent_cols[None, :], mask=valid[:, None], other=0.0)
        k_pe = tl.load(kv_ptr + rows[:, None] + LATENT_DIM + rope_cols[None, :], mask=valid[:, None], other=0.0)
        latent = latent.to(DOT_DTYPE)

        scores = tl.dot(q_nope, tl.trans(latent)) + tl.dot(q_pe, tl.trans(k_pe.to(DOT_DTYPE)))
        if KV_SCALE_MODE == 2:
            token_scale = tl.load(kv_scale_ptr + pages.to(tl.int64) * PAGE_SIZE + slots, mask=valid, other=0.0)
            scores = scores * token_scale[None, :]
        scores = tl.where(valid[None, :], scores * scale_log2, float("-inf"))

        new_max = tl.maximum(running_max, tl.max(scores, axis=1))
        correction = tl.exp2(running_max - new_max)
        probs = tl.exp2(scores - new_max[:, None])
        running_sum = running_sum * correction + tl.sum(probs, axis=1)
        if KV_SCALE_MODE == 2:
            probs = probs * token_scale[None, :]
        acc = acc * correction[:, None] + tl.dot(probs.to(DOT_DTYPE), latent)
        running_max = new_max

    if KV_SCALE_MODE == 1:
        acc = acc * tensor_scale
    safe_sum = tl.where(running_sum > 0, running_sum, 1.0)
    acc = acc / safe_sum[:, None]

    if NUM_SPLITS == 1:
        tl.store(
            out_ptr + seq * stride_o_b + heads[:, None] * stride_o_h + latent_cols[None, :],
            acc.to(out_ptr.dtype.element_ty), mask=head_mask[:, None],
        )
    else:
        lse = tl.where(running_sum > 0, running_max + tl.log2(safe_sum), float("-inf"))
        used = tl.where(start < end, head_mask, False)  # the merge reads only the splits that hold tokens
        tl.store(
            partial_out_ptr + seq * stride_po_b + heads[:, None] * stride_po_h + split * stride_po_s
            + latent_cols[None, :],
            acc, mask=used[:, None],
        )
        tl.store(partial_lse_ptr + seq * stride_pl_b + heads * stride_pl_h + split, lse, mask=used)


@triton.jit
def _mla_decode_merge_kernel(
    partial_out_ptr, partial_lse_ptr, out_ptr, seq_lens_ptr,
    stride_po_b, stride_po_h, stride_po_s,
    stride_pl_b, stride_pl_h,
    stride_o_b, stride_o_h,
    NUM_SPLITS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, BLOCK_S)
    seq_len = tl.load(seq_lens_ptr + seq)
    split_mask = splits < tl.cdiv(seq_len, _split_len(seq_len, NUM_SPLITS, BLOCK_N))
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)

    lse = tl.load(partial_lse_ptr + seq * stride_pl_b + head * stride_pl_h + splits, mask=split_mask,
                  other=float("-inf"))
    top = tl.max(lse, axis=0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weights = tl.exp2(lse - top)
    total = tl.sum(weights, axis=0)
    partial = tl.load(
        partial_out_ptr + seq * stride_po_b + head * stride_po_h + splits[:, None] * stride_po_s + cols[None, :],
        mask=split_mask[:, None], other=0.0,
    )
    merged = tl.sum(partial * weights[:, None], axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + seq * stride_o_b + head * stride_o_h + cols, merged.to(out_ptr.dtype.element_ty))


def default_num_splits(batch: int, num_heads: int, max_context: int, device: torch.device) -> int:
    """Enough splits to give every SM about two programs, never splits shorter than 256 tokens.

    Depends only on shapes (max_context is the block-table capacity), so it is CUDA-graph safe.
    """
    head_blocks = triton.cdiv(num_heads, _block_h(num_heads))
    wanted = math.ceil(2 * multiprocessor_count(device) / (batch * head_blocks))
    return max(1, min(wanted, triton.cdiv(max_context, MIN_TOKENS_PER_SPLIT), MAX_SPLITS))


def _block_h(num_heads: int) -> int:
    return max(16, triton.next_power_of_2(num_heads))


def _kv_scale_mode(kv_scale: torch.Tensor | None) -> int:
    if kv_scale is None:
        return KV_SCALE_NONE
    return KV_SCALE_TENSOR if kv_scale.numel() == 1 else KV_SCALE_TOKEN


def mla_decode(
    q_nope_absorbed: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
    *,
    num_splits: int | None = None,
    out: torch.Tensor | None = None,
    block_n: int = 32,
    num_warps: int = 8,
    num_stages: int = 2,
) -> torch.Tensor:
    """Triton absorbed MLA decode; same contract as ops.mla_decode.

    kv_cache may be bf16/fp16 (no kv_scale) or float8_e4m3fn with kv_scale: a one-element float32
    tensor (per-tensor) or [num_blocks, block_size] float32 (per token). Latent and rope dims must
    be powers of two (512 and 64 for GLM). num_splits=None picks default_num_splits from shapes.
    """
    batch, num_heads, latent_dim = q_nope_absorbed.shape
    rope_dim = q_pe.shape[-1]
    num_blocks, page_size, row_dim = kv_cache.shape
    if row_dim != latent_dim + rope_dim:
        raise ValueError(f"kv_cache rows hold {row_dim} values, expected {latent_dim} + {rope_dim}")
    if not (is_power_of_two(latent_dim) and is_power_of_two(rope_dim)):
        raise ValueError("latent and rope dims must be powers of two")
    if q_nope_absorbed.stride(-1) != 1 or q_pe.stride(-1) != 1 or kv_cache.stride(-1) != 1:
        raise ValueError("the last dim of q_nope_absorbed, q_pe and kv_cache must be contiguous")
    if kv_cache.dtype == torch.float8_e4m3fn and kv_scale is None:
        raise ValueError("an fp8 kv_cache needs kv_scale")
    if kv_scale is not None and kv_scale.numel() > 1 and kv_scale.shape != (num_blocks, page_size):
        raise ValueError("per-token kv_scale must be [num_blocks, block_size]")

    device = q_nope_absorbed.device
    if num_splits is None:
        num_splits = default_num_splits(batch, num_heads, block_tables.shape[1] * page_size, device)
    if out is None:
        out = torch.empty_like(q_nope_absorbed)
    block_h = _block_h(num_heads)
    if num_splits > 1:
        partial_out = torch.empty(batch, num_heads, num_splits, latent_dim, dtype=torch.float32, device=device)
        partial_lse = torch.empty(batch, num_heads, num_splits, dtype=torch.float32, device=device)
    else:  # stage 1 writes `out` directly; these are never touched
        partial_out = partial_lse = out
    scale_ptr = kv_scale.float().contiguous() if kv_scale is not None else out

    grid = (batch, triton.cdiv(num_heads, block_h), num_splits)
    _mla_decode_split_kernel[grid](
        q_nope_absorbed, q_pe, kv_cache, scale_ptr, block_tables, seq_lens,
        partial_out, partial_lse, out,
        scale * math.log2(math.e),
        num_heads,
        q_nope_absorbed.stride(0), q_nope_absorbed.stride(1), q_pe.stride(0), q_pe.stride(1),
        kv_cache.stride(0), kv_cache.stride(1),
        block_tables.stride(0),
        partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1),
        out.stride(0), out.stride(1),
        PAGE_SIZE=page_size,
        LATENT_DIM=latent_dim,
        ROPE_DIM=rope_dim,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        NUM_SPLITS=num_splits,
        KV_SCALE_MODE=_kv_scale_mode(kv_scale),
        DOT_DTYPE=dot_dtype(device, q_nope_absorbed.dtype),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    if num_splits > 1:
        block_s = triton.next_power_of_2(num_splits)
        block_c = min(latent_dim, MERGE_TILE_ELEMENTS // block_s)
        _mla_decode_merge_kernel[(batch, num_heads, latent_dim // block_c)](
            partial_out, partial_lse, out, seq_lens,
            partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
            partial_lse.stride(0), partial_lse.stride(1),
            out.stride(0), out.stride(1),
            NUM_SPLITS=num_splits,
            BLOCK_N=block_n,
            BLOCK_S=block_s,
            BLOCK_C=block_c,
            num_warps=4,
        )
    return out
