"""The CUDA path's attention batch: the context described by tensors only, so a decode step can be
replayed from a CUDA graph.

- absorbed (decode, and prefill chunks too short to amortize an expansion): one query row per
  entry of `block_tables` / `seq_lens`, through ops.mla_decode (the Triton kernel on a GPU). A
  seq_len that stops at the query's own position is the causal mask.
- expanded (longer prefill chunks of one sequence): the whole context gathered, expanded to
  per-head keys and values and handed to SDPA, its queries aligned to the bottom right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from glmcode.engine import ops
from glmcode.engine.kv_cache import LayerCache
from glmcode.engine.model.attention import MLAttention, expand_context


@dataclass(frozen=True)
class ExpandedContext:
    """The new tokens of one sequence are its last ones; they attend over all `length` tokens."""

    block_table: torch.Tensor  # [blocks covering length] (long, for indexing)
    length: int


@dataclass(frozen=True)
class PagedBatch:
    positions: torch.Tensor  # [T]
    write_slots: torch.Tensor  # [T]
    block_tables: torch.Tensor | None = None  # [T, max_blocks] int32: absorbed, one row per token
    seq_lens: torch.Tensor | None = None  # [T] int32
    context: ExpandedContext | None = None  # expanded instead

    def attend(self, attn: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        if self.context is not None:
            return self._expanded(attn, q_nope, q_pe, cache)
        q_latent = attn.kv_b_proj.absorb_query(q_nope.transpose(0, 1)).transpose(0, 1)  # [B, N, L]
        out_latent = ops.mla_decode(
            q_latent.contiguous(), q_pe.contiguous(), cache.paged, self.block_tables, self.seq_lens, attn.scale,
            cache.paged_scales,
        )
        return attn.kv_b_proj.values(out_latent.transpose(0, 1)).transpose(0, 1)  # [B, N, V]

    def _expanded(self, attn: MLAttention, q_nope, q_pe, cache: LayerCache) -> torch.Tensor:
        """[T, N, P] + [T, N, R] of the context's last T tokens -> [T, N, V], through SDPA.

        Keys and values of the whole context are made once per layer (about 4 GB at a 200K
        context, so a full context prefills beside the weights).
        """
        context = self.context
        rows = cache.gather(context.block_table, context.length).to(q_nope.dtype)  # [S, L + R]
        latent, k_pe = rows.split([attn.latent_dim, attn.rope_dim], -1)
        k_nope, values = expand_context(attn.kv_b_proj, latent)  # [N, S, P], [N, S, V]
        keys = torch.cat([k_nope, k_pe.expand(attn.num_heads, -1, -1)], -1)  # [N, S, P + R]
        del k_nope
        queries = torch.cat([q_nope, q_pe], -1).transpose(0, 1)  # [N, T, P + R]
        num_queries = queries.shape[1]
        if num_queries == context.length:
            mask, causal = None, True
        else:  # queries are the last T positions: causal, aligned to the bottom-right corner
            mask, causal = causal_lower_right(num_queries, context.length), False
        out = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=mask, is_causal=causal, scale=attn.scale
        )
        return out[0].transpose(0, 1)
