"""Multi-head latent attention (MLA) over the paged latent cache.

Per token and layer the cache holds 576 values: the normalized 512-d latent c_kv and the roped
64-d key k_pe that all heads share. Prefill expands the latent into per-head keys and values
(compute-friendly); decode folds the key up-projection into the query and the value
up-projection into the output, and attends over the cached latent directly (data-movement
friendly: the cache is never re-expanded).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from glmcode.engine.config import LATENT_NORM_EPS, ModelConfig
from glmcode.engine.layers import RMSNorm, apply_rotary, linear


@dataclass(frozen=True)
class KVSpan:
    """A run of consecutive cache slots holding consecutive positions of one sequence."""

    slot: int  # first slot in the layer's flat [num_blocks * block_size] cache
    length: int


@dataclass
class AttentionBatch:
    """What attention needs to know about the tokens in one forward pass.

    Prefill: the tokens are one chunk of one sequence, starting at `prefill_start`.
    Decode: one new token per sequence. `contexts[i]` covers all positions of sequence i up to
    and including its new tokens, in order.
    """

    positions: torch.Tensor  # [T] position of each token
    write_slots: torch.Tensor  # [T] cache slot each token's latent goes to
    contexts: list[list[KVSpan]]
    prefill_start: int | None = None
    kv_piece_tokens: int = 4096  # prefill attends to the context in pieces of at most this size

    @property
    def is_prefill(self) -> bool:
        return self.prefill_start is not None


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.softmax_scale
        hidden, heads = config.hidden_size, config.num_attention_heads
        q_out = heads * config.qk_head_dim
        if config.q_lora_rank is None:
            self.q_proj = linear(hidden, q_out)
        else:
            self.q_a_proj = linear(hidden, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = linear(config.q_lora_rank, q_out)
        self.kv_a_proj_with_mqa = linear(hidden, config.kv_cache_dim)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = linear(config.kv_lora_rank, heads * (self.nope_dim + self.v_dim))
        self.o_proj = linear(heads * self.v_dim, hidden)

    def forward(
        self,
        x: torch.Tensor,
        batch: AttentionBatch,
        kv_cache: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> torch.Tensor:
        """x: [T, hidden]; kv_cache: this layer's [num_slots, 576]. Writes the new latents."""
        num_tokens = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_pe = q.view(num_tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], -1)
        q_pe = apply_rotary(q_pe, cos, sin)

        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rotary(k_pe, cos, sin)
        kv_cache.index_copy_(0, batch.write_slots, torch.cat([latent, k_pe], -1))

        if batch.is_prefill:
            out = self._expanded_attention(q_nope, q_pe, kv_cache, batch)
        else:
            out = self._absorbed_attention(q_nope, q_pe, kv_cache, batch)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))

    def _expanded_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """Causal attention of one prefill chunk over its sequence's whole context.

        The context is expanded through kv_b_proj piece by piece and combined with an online
        softmax, so activation memory stays bounded however long the context is.
        """
        (spans,) = batch.contexts
        first_query = batch.prefill_start
        query_pos = batch.positions[:, None]
        q_nope_h = q_nope.transpose(0, 1)  # [N, T, P]
        running_max = running_sum = acc = None
        for start_pos, piece in _pieces(kv_cache, spans, batch.kv_piece_tokens):
            length = piece.shape[0]
            latent, k_pe = piece.split([self.latent_dim, self.rope_dim], -1)
            k_nope, v = self.kv_b_proj(latent).view(length, self.num_heads, -1).split([self.nope_dim, self.v_dim], -1)
            scores = torch.matmul(q_nope_h, k_nope.permute(1, 2, 0)).float()  # [N, T, S]
            scores += torch.matmul(q_pe, k_pe.t()).transpose(0, 1).float()
            scores *= self.scale
            if start_pos + length - 1 > first_query:
                key_pos = torch.arange(start_pos, start_pos + length, device=scores.device)
                scores.masked_fill_(key_pos[None, :] > query_pos, float("-inf"))

            piece_max = scores.amax(-1, keepdim=True)
            new_max = piece_max if running_max is None else torch.maximum(running_max, piece_max)
            probs = torch.exp(scores - new_max)
            piece_out = torch.matmul(probs.to(v.dtype), v.transpose(0, 1)).float()  # [N, T, V]
            if acc is None:
                running_sum, acc = probs.sum(-1, keepdim=True), piece_out
            else:
                rescale = torch.exp(running_max - new_max)
                running_sum = running_sum * rescale + probs.sum(-1, keepdim=True)
                acc = acc * rescale + piece_out
            running_max = new_max
        out = acc / running_sum
        return out.transpose(0, 1).to(q_nope.dtype)  # [T, N, V]

    def _absorbed_attention(
        self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, batch: AttentionBatch
    ) -> torch.Tensor:
        """One new token per sequence attends over that sequence's cached latents."""
        # kv_b_proj rows are per head [nope | v]; views, not copies.
        w_kv = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.latent_dim)
        w_uk, w_uv = w_kv[:, : self.nope_dim], w_kv[:, self.nope_dim :]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk)  # [N, B, L]
        queries = torch.cat([q_latent, q_pe.transpose(0, 1)], -1)  # [N, B, L + R]
        out_latent = torch.empty_like(q_latent)
        for i, spans in enumerate(batch.contexts):
            pieces = [kv_cache[span.slot : span.slot + span.length] for span in spans]
            query = queries[:, i]  # [N, L + R]
            scores = torch.cat([torch.mm(query, piece.t()) for piece in pieces], -1).float()
            probs = torch.softmax(scores * self.scale, -1).to(query.dtype)
            offset, result = 0, None
            for piece in pieces:
                part = torch.mm(probs[:, offset : offset + piece.shape[0]], piece[:, : self.latent_dim])
                result = part if result is None else result + part
                offset += piece.shape[0]
            out_latent[:, i] = result
        return torch.bmm(out_latent, w_uv.transpose(1, 2)).transpose(0, 1)  # [B, N, V]


def _pieces(kv_cache: torch.Tensor, spans: list[KVSpan], max_tokens: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, cache view) for consecutive pieces of a context, each <= max_tokens."""
    pos = 0
    for span in spans:
        for offset in range(0, span.length, max_tokens):
            length = min(max_tokens, span.length - offset)
            yield pos, kv_cache[span.slot + offset : span.slot + offset + length]
            pos += length
