"""The model's compute operations, each written once here in PyTorch.

The model (engine/model) calls these functions. Those with a GPU kernel run it on CUDA tensors
when triton is installed (the Triton code is in engine/cuda), those with a CPU kernel run it on
float32 / bfloat16 CPU tensors where the form of glmcode's C++ extension built there has it
(engine/cpu: the AVX-512 form has them all, the AVX2 one the softmax); everywhere else
they run the PyTorch body below, which is also the oracle the kernel tests compare against
(`op.reference`). Importing this module never imports triton.

Contracts (T tokens, N heads, L = 512 latent, R = 64 rope, E experts, k slots):

- linear(x, weight) -> x @ weight.T (no kernel of its own: few-row CPU inputs take a faster form).
- rms_norm(x, weight, eps); add_rms_norm(x, residual, weight, eps) -> (normed, x + residual).
- silu_mul(gate_up [..., 2I]) -> [..., I].
- rope_(q_pe [T, N, R], k_pe [T, R], positions [T], cos_sin [max_positions, R]) rotates in place.
- route_topk(logits [T, E] float32, correction_bias [E], top_k, scaling, normalize,
  shared_expert_id=None) -> (ids [T, k(+1)] int32, weights [T, k(+1)] float32).
- fused_moe(x [T, H], w13 [E, 2I, H], w2 [E, H, I], topk_ids [T, k], topk_weights [T, k]) -> [T, H].
- causal_softmax_(scores [N, t, S], first_query, first_key) -> log_mass [N, t, 1] float32; scores
  become probabilities in place.
- mla_decode(q_latent [B, N, L], q_pe [B, N, R], kv_cache [blocks, block_size, L + R],
  block_tables [B, max_blocks] int32, seq_lens [B] int32, scale, kv_scale=None) -> [B, N, L].
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Callable

import torch
import torch.nn.functional as F


@functools.cache
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def uses_triton(tensor: torch.Tensor) -> bool:
    """Whether the ops run their Triton kernel for this tensor (CUDA and triton installed)."""
    return tensor.is_cuda and triton_available()


def kernel(cuda: str | None = None, cpu: str | None = None):
    """Decorator: the op runs `glmcode.engine.cuda.<cuda>` for tensors `uses_triton` accepts, and
    ``torch.ops.glmcode_cpu.<cpu>`` for float32 / bfloat16 CPU tensors where glmcode's C++
    extension is available; its own body everywhere else."""

    def wrap(reference: Callable) -> Callable:
        @functools.wraps(reference)
        def dispatch(first: torch.Tensor, *args, **kwargs):
            if cuda is not None and uses_triton(first):
                module_name, name = cuda.split(".")
                module = importlib.import_module(f"glmcode.engine.cuda.{module_name}")
                return getattr(module, name)(first, *args, **kwargs)
            if cpu is not None and first.is_cpu and first.dtype in (torch.float32, torch.bfloat16) and _cpu_kernel(cpu):
                return getattr(torch.ops.glmcode_cpu, cpu)(first, *args, **kwargs)
            return reference(first, *args, **kwargs)

        dispatch.reference = reference
        return dispatch

    return wrap


def _cpu_kernel(name: str) -> bool:
    from glmcode.engine.cpu import kernels

    return kernels.has_op(name)


# ----- projections, norms and activations -----


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T. Decode multiplies one or a few rows by big weights; on CPU, torch.mv and
    weight @ x.T run those 3-4x faster than F.linear (measured in bf16, torch 2.13)."""
    rows = x.numel() // x.shape[-1]
    if not x.is_cpu or rows > 32 or uses_triton(x):  # kernels want the plain (contiguous) output
        return F.linear(x, weight)
    flat = x.reshape(rows, x.shape[-1])
    if rows == 1:
        out = torch.mv(weight, flat[0])
    else:
        out = torch.mm(weight, flat.t()).t()
    return out.reshape(*x.shape[:-1], weight.shape[0])



@kernel(cuda="triton_fused.rms_norm", cpu="rms_norm")
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * x / sqrt(mean(x^2) + eps) over the last dim, in the reference implementation's
    order: normalise in float32, cast to x's dtype, then multiply by the weight."""
    x32 = x.float()
    normed = (x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)).to(x.dtype)
    return (weight * normed).to(x.dtype)


@kernel(cuda="triton_fused.add_rms_norm", cpu="add_rms_norm")
def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): the pre-norm block boundary in one step."""
    summed = (x.float() + residual.float()).to(x.dtype)
    return rms_norm.reference(summed, weight, eps), summed


@kernel(cuda="triton_fused.silu_mul", cpu="silu_mul")
def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[..., 2I] -> silu(gate) * up, [..., I]; computed in float32, returned in the input dtype."""
    gate, up = gate_up.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(gate_up.dtype)


# ----- rotary embedding -----


@kernel(cuda="triton_fused.rope_", cpu="rope_")
def rope_(q_pe: torch.Tensor, k_pe: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    """Rotate the pairs (x[2i], x[2i+1]) of q_pe [T, N, R] and k_pe [T, R] by position * inv_freq[i],
    in place, computing in float32.

    The rotated pairs come out de-interleaved (all first elements, then all second elements),
    exactly as the reference implementation lays them out. Queries and keys get the same
    permutation, so q.k is unchanged by it, and the cache stores keys in this layout.
    cos_sin: float32 [max_positions, R], the cos of the R/2 frequencies, then their sin.
    """
    half = q_pe.shape[-1] // 2
    table = cos_sin[positions]
    for x, shape in ((q_pe, (-1, 1, half)), (k_pe, (-1, half))):
        cos, sin = table[:, :half].view(shape), table[:, half:].view(shape)
        even, odd = x.float()[..., 0::2], x.float()[..., 1::2]
        x.copy_(torch.cat([even * cos - odd * sin, odd * cos + even * sin], dim=-1))


# ----- mixture of experts -----


@kernel(cuda="triton_fused.route_topk")
def route_topk(
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


def with_shared_expert(topk_ids: torch.Tensor, topk_weights: torch.Tensor, shared_expert_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append the shared expert as an always-selected extra slot with weight 1 (for expert stacks
    that hold it at index `shared_expert_id`, see MoE.fold_shared_expert)."""
    tokens = topk_ids.shape[0]
    shared_ids = torch.full((tokens, 1), shared_expert_id, dtype=topk_ids.dtype, device=topk_ids.device)
    shared_weights = torch.ones((tokens, 1), dtype=topk_weights.dtype, device=topk_weights.device)
    return torch.cat([topk_ids, shared_ids], dim=1), torch.cat([topk_weights, shared_weights], dim=1)


@kernel(cuda="moe.fused_moe")
def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """Sum over slots of weight * down(silu(gate(x)) * up(x)); w13 holds gate rows then up rows."""

    def expert(index: int, rows: torch.Tensor) -> torch.Tensor:
        return linear(silu_mul(linear(rows, w13[index])), w2[index])

    return moe_by_expert(x, topk_ids, topk_weights, expert)


def moe_by_expert(
    x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, expert: Callable[[int, torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """sum_k topk_weights[t, k] * expert(topk_ids[t, k], x[t]) for every token t.

    Each expert some token picked runs once, on all of its tokens; the weighted sum is
    accumulated in float32 and returned in x's dtype. Float and quantized experts share this.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if x.shape[0] == 1:  # decode: no grouping needed
        for index, weight in zip(topk_ids[0].tolist(), topk_weights[0].float().unbind()):
            out += expert(index, x).float() * weight
        return out.to(x.dtype)
    flat_ids = topk_ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    experts, counts = torch.unique_consecutive(flat_ids[order], return_counts=True)
    token_of = order // topk_ids.shape[1]
    sorted_weights = topk_weights.flatten()[order].float()
    start = 0
    for index, count in zip(experts.tolist(), counts.tolist()):
        tokens = token_of[start : start + count]
        y = expert(index, x[tokens]).float() * sorted_weights[start : start + count, None]
        out.index_add_(0, tokens, y)
        start += count
    return out.to(x.dtype)


# ----- attention -----


@kernel(cpu="causal_softmax_")
def causal_softmax_(scores: torch.Tensor, first_query: int, first_key: int) -> torch.Tensor:
    """Scaled scores [N, t, S] of the queries at positions first_query.. over the keys at
    first_key.., in place: each row becomes its softmax (float32 math) over the keys at or before
    its query, 0 over the rest. Returns each row's log total mass, logsumexp over those keys
    [N, t, 1] float32 (-inf for a row with none), to merge pieces of a context softmaxed apart.
    """
    queries, keys = scores.shape[1], scores.shape[2]
    key_pos = torch.arange(first_key, first_key + keys, device=scores.device)
    query_pos = torch.arange(first_query, first_query + queries, device=scores.device)[:, None]
    masked = scores.float().masked_fill(key_pos > query_pos, float("-inf"))
    log_mass = torch.logsumexp(masked, -1, keepdim=True)
    scores.copy_(torch.softmax(masked, -1).nan_to_num_(0.0))  # a row with no keys: 0/0
    return log_mass


@kernel(cuda="triton_mla.mla_decode")
def mla_decode(
    q_latent: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    kv_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Absorbed MLA attention: one query row per entry against its cached latents.

    q_latent [B, N, L] (the query already multiplied by W_UK), q_pe [B, N, R] (roped), kv_cache
    [num_blocks, block_size, L + R] (latent ‖ roped k_pe), block_tables [B, max_blocks] int32,
    seq_lens [B] int32 (tokens to attend to, the query's own included and already written),
    kv_scale: None, a one-element tensor (per-tensor fp8 scale) or [num_blocks, block_size]
    (per-token scales). Returns [B, N, L] in the query dtype; softmax and sums in float32. An
    entry with seq_len 0 gets zeros.
    """
    latent_dim = q_latent.shape[-1]
    out = torch.zeros_like(q_latent)
    per_token_scale = kv_scale is not None and kv_scale.numel() > 1
    for b, seq_len in enumerate(seq_lens.tolist()):
        if seq_len == 0:
            continue
        rows = _sequence_rows(kv_cache, block_tables[b], seq_len).float()
        if per_token_scale:
            rows = rows * _sequence_rows(kv_scale, block_tables[b], seq_len).float()[:, None]
        elif kv_scale is not None:
            rows = rows * kv_scale.float()
        latent, k_pe = rows[:, :latent_dim], rows[:, latent_dim:]
        scores = (q_latent[b].float() @ latent.T + q_pe[b].float() @ k_pe.T) * scale
        out[b] = (torch.softmax(scores, dim=-1) @ latent).to(out.dtype)
    return out


def _sequence_rows(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first `seq_len` rows of one sequence from a paged `[num_blocks, block_size, ...]` cache."""
    num_blocks = -(-seq_len // cache.shape[1])
    pages = cache[block_table[:num_blocks].long()]
    return pages.reshape(-1, *cache.shape[2:])[:seq_len]
