"""GPU kernels for the engine, each with a plain-PyTorch twin of the same contract.

The functions below dispatch: Triton on CUDA tensors when triton is importable, the PyTorch
reference otherwise (CPU, or no triton). Importing this package never imports triton; the Triton
modules (triton_mla, triton_moe, triton_fused) are imported on first CUDA use.

Contracts (B sequences, T tokens, H heads, Dl = 512 latent, Dr = 64 rope, E experts, k slots):

- mla_decode(q_nope_absorbed [B,H,Dl], q_pe [B,H,Dr], kv_cache [num_blocks, block_size, Dl+Dr],
  block_tables [B, max_blocks] int32, seq_lens [B] int32, scale, kv_scale=None) -> [B,H,Dl]
  Absorbed MLA decode over the paged latent cache (latent ‖ roped k_pe per token). kv_scale is for
  a float8_e4m3fn cache: one-element tensor (per tensor) or [num_blocks, block_size] (per token).
- absorbed_mla_decode(q_nope [B,N,P], q_pe, w_uk [N,P,L], w_uv [N,V,L], kv_cache, block_tables,
  seq_lens, scale, kv_scale=None) -> [B,N,V]: W_UK folded into q, mla_decode, then W_UV.
- fused_moe(x [T,Hd], w13 [E,2I,Hd], w2 [E,Hd,I], topk_ids [T,k], topk_weights [T,k]) -> [T,Hd]
  Sum over slots of weight * down(silu(gate(x)) * up(x)). Fold the shared expert in with
  stack_shared_expert (weights, once at load) and with_shared_expert (routing, per call).
  On CUDA, bf16 batches above FUSED_MOE_MAX_TOKENS go to grouped_moe.
- grouped_moe(...) same contract via torch._grouped_mm, for prefill (see grouped_mm_available).
- route_topk(logits [T,E] fp32, correction_bias [E], top_k, scaling, normalize, shared_expert_id=None)
  -> (ids [T,k(+1)] int32, weights [T,k(+1)] fp32): sigmoid routing after the router GEMV, with
  the shared expert's slot appended when its id is given.
- rms_norm(x, weight, eps); add_rms_norm(x, residual, weight, eps) -> (normed, x + residual).
- rope_interleaved_(q_pe [T,N,Dr], k_pe [T,Dr], positions [T], cos_sin, deinterleave=False):
  in place; cos_sin = reference.rope_cos_sin(max_positions, Dr, theta).
- silu_mul(gate_up [...,2I]) -> [...,I].

cuda_graphs.GraphedStep replays a decode step from per-batch-bucket CUDA graphs.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from glmcode.engine.cuda import reference
from glmcode.engine.cuda.reference import (
    grouped_mm_available,
    grouped_moe,
    quantize_fp8_per_tensor,
    rope_cos_sin,
    stack_shared_expert,
    with_shared_expert,
)

__all__ = [
    "absorbed_mla_decode",
    "add_rms_norm",
    "fused_moe",
    "grouped_mm_available",
    "grouped_moe",
    "mla_decode",
    "quantize_fp8_per_tensor",
    "rms_norm",
    "rope_cos_sin",
    "rope_interleaved_",
    "route_topk",
    "silu_mul",
    "stack_shared_expert",
    "triton_available",
    "uses_triton",
    "with_shared_expert",
]


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the dispatchers below run Triton for this tensor (CUDA and triton installed)."""
    return tensor.is_cuda and triton_available()


def mla_decode(q_nope_absorbed, q_pe, kv_cache, block_tables, seq_lens, scale, kv_scale=None):
    if uses_triton(q_nope_absorbed):
        from glmcode.engine.cuda import triton_mla

        return triton_mla.mla_decode(q_nope_absorbed, q_pe, kv_cache, block_tables, seq_lens, scale, kv_scale)
    return reference.mla_decode_reference(q_nope_absorbed, q_pe, kv_cache, block_tables, seq_lens, scale, kv_scale)


# Above this many tokens (prefill) torch._grouped_mm takes over from the Triton fused MoE.
FUSED_MOE_MAX_TOKENS = 64


def absorbed_mla_decode(q_nope, q_pe, w_uk, w_uv, kv_cache, block_tables, seq_lens, scale, kv_scale=None):
    """The whole absorbed decode: [B,N,P] nope queries -> [B,N,V] per-head outputs.

    w_uk [N,P,L] and w_uv [N,V,L] are kv_b_proj.weight viewed as [N, P+V, L] and split. The
    query is folded into latent space (q_nope @ W_UK), attends over the cached latents, and the
    latent output is lifted back with W_UV.
    """
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1).contiguous()  # [B, N, L]
    o_latent = mla_decode(q_latent, q_pe.contiguous(), kv_cache, block_tables, seq_lens, scale, kv_scale)
    return torch.bmm(o_latent.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)  # [B, N, V]


def fused_moe(x, w13, w2, topk_ids, topk_weights):
    if uses_triton(x):
        if x.shape[0] > FUSED_MOE_MAX_TOKENS and x.dtype == torch.bfloat16 and grouped_mm_available(x.device):
            return grouped_moe(x, w13, w2, topk_ids, topk_weights)
        from glmcode.engine.cuda import triton_moe

        return triton_moe.fused_moe(x, w13, w2, topk_ids, topk_weights)
    return reference.fused_moe_reference(x, w13, w2, topk_ids, topk_weights)


def route_topk(logits, correction_bias, top_k, scaling, normalize, shared_expert_id=None):
    if uses_triton(logits):
        from glmcode.engine.cuda import triton_fused

        return triton_fused.route_topk(logits, correction_bias, top_k, scaling, normalize, shared_expert_id)
    return reference.route_topk_reference(logits, correction_bias, top_k, scaling, normalize, shared_expert_id)


def rms_norm(x, weight, eps):
    if uses_triton(x):
        from glmcode.engine.cuda import triton_fused

        return triton_fused.rms_norm(x, weight, eps)
    return reference.rms_norm_reference(x, weight, eps)


def add_rms_norm(x, residual, weight, eps):
    if uses_triton(x):
        from glmcode.engine.cuda import triton_fused

        return triton_fused.add_rms_norm(x, residual, weight, eps)
    return reference.add_rms_norm_reference(x, residual, weight, eps)


def rope_interleaved_(q_pe, k_pe, positions, cos_sin, deinterleave=False) -> None:
    if uses_triton(q_pe):
        from glmcode.engine.cuda import triton_fused

        triton_fused.rope_interleaved_(q_pe, k_pe, positions, cos_sin, deinterleave)
        return
    q_pe.copy_(reference.rope_interleaved_reference(q_pe, positions, cos_sin, deinterleave))
    k_pe.copy_(reference.rope_interleaved_reference(k_pe, positions, cos_sin, deinterleave))


def silu_mul(gate_up):
    if uses_triton(gate_up):
        from glmcode.engine.cuda import triton_fused

        return triton_fused.silu_mul(gate_up)
    return reference.silu_mul_reference(gate_up)
