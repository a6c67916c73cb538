"""Multi-head latent attention (MLA) over the paged latent cache.

Per token and layer the cache holds 576 values: the normalized 512-d latent c_kv and the roped
64-d key k_pe that all heads share. Two equivalent ways to attend over it:

- expanded: kv_b_proj turns each cached latent into per-head keys and values, then ordinary
  multi-head attention. Cheapest for long prefill chunks, where the expansion is amortized.
- absorbed: the key up-projection is folded into the query and the value up-projection into
  the output, so queries attend over the cached latents directly and the cache is never
  re-expanded. Used for decode, and for prefill chunks too short to amortize an expansion.

Which form, and which kernels compute it, is the batch's business: the runner that built the
batch chose. `SpanBatch` (here; the module and fused-CPU runners) walks the context in pieces,
each softmaxed on its own and then merged exactly, so memory stays bounded at any length;
`cuda.attention.PagedBatch` (the CUDA runner) describes the context with tensors only, so a
decode step can be captured in a CUDA graph. The projections, norms, rope and the cache write
around it are the same for every path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine.config import LATENT_NORM_EPS, ModelConfig
from glmcode.engine.kv_cache import KVSpan, LayerCache
from glmcode.engine import ops
from glmcode.engine.model.layers import RMSNorm, linear


@dataclass(frozen=True)
class SequenceSlice:
    """The new tokens of one sequence within a forward pass."""

    rows: slice  # their rows in the pass
    first_position: int  # position of the first of them
    # Cache slots of every position up to the last of them, in order (possibly further, to the
    # end of a block: keys after the last query are masked).
    spans: list[KVSpan]


class AttentionBatch(Protocol):
    """Where a forward pass's new tokens sit, and how they attend over the cache."""

    positions: torch.Tensor  # [T] position of each new token
    write_slots: torch.Tensor  # [T] cache slot each new token's latent goes to

    def attend(self, attn: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """q_nope [T, N, P] and roped q_pe [T, N, R] -> per-head outputs [T, N, V]; the new
        tokens' latents are already in the cache."""
        ...


# Beyond this many context tokens the absorbed form wins on CPU whatever the chunk (see below).
EXPANDED_MAX_CONTEXT = 2048
# The torch absorbed form takes a long chunk's rows in blocks of this many, each block over the
# context up to its own last row, so the scores skip most of the causally masked corner.
CAUSAL_BLOCK_ROWS = 64


def expanded_is_cheaper(config: ModelConfig, num_queries: int, context: int) -> bool:
    """Whether expanding the context beats absorbed attention for a chunk of num_queries tokens
    whose context (the chunk included) is `context` tokens.

    By FLOPs: expanding the keys costs 2*N*P*L per context token once; then each (query, key)
    pair costs 2*N*(P+R) for the score and 2*N*L for the latent value. Absorbed attention costs
    2*N*(L+R) + 2*N*L per pair and no expansion. But the absorbed scores are one large product
    for all heads, the expanded ones a small product per head, which runs ~3x slower per FLOP on
    CPU (bf16, torch 2.13): at 20 heads and 512 queries, measured, absorbed is ahead from about
    EXPANDED_MAX_CONTEXT tokens of context.
    """
    heads, latent = config.num_attention_heads, config.kv_lora_rank
    expansion = 2 * heads * config.qk_nope_head_dim * latent
    expanded_pair = 2 * heads * (config.qk_head_dim + latent)
    absorbed_pair = 2 * heads * (latent + config.qk_rope_head_dim + latent)
    return context <= EXPANDED_MAX_CONTEXT and num_queries * (absorbed_pair - expanded_pair) > expansion


class KVBProjection(nn.Module):
    """kv_b_proj, kept as its two per-head halves for absorbed attention.

    The checkpoint's kv_b_proj [N * (P + V), L] is split into W_UK transposed [N, L, P] and
    W_UV [N, V, L], each contiguous per head and laid out so that decode multiplies them as the
    left operand (the fast matrix-vector orientation on CPU). A quantized variant replaces this
    module whole, keeping its methods.
    """

    def __init__(self, heads: int, latent_dim: int, nope_dim: int, v_dim: int):
        super().__init__()
        self.w_uk_t = nn.Parameter(torch.empty(heads, latent_dim, nope_dim))
        self.w_uv = nn.Parameter(torch.empty(heads, v_dim, latent_dim))

    def load(self, weight: torch.Tensor) -> None:
        """Fill W_UK and W_UV from kv_b_proj.weight, whose rows are per head [nope | v]."""
        heads, latent, nope = self.w_uk_t.shape
        per_head = weight.view(heads, nope + self.w_uv.shape[1], latent)
        self.w_uk_t.copy_(per_head[:, :nope].transpose(1, 2))
        self.w_uv.copy_(per_head[:, nope:])

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        """q_nope [N, T, P] -> its keys' weights folded in: [N, T, L]."""
        return torch.bmm(self.w_uk_t, q_nope.transpose(1, 2)).transpose(1, 2)

    def values(self, latent: torch.Tensor) -> torch.Tensor:
        """Attention-weighted latents [N, T, L] -> per-head values [N, T, V]."""
        return torch.bmm(self.w_uv, latent.transpose(1, 2)).transpose(1, 2)

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_UK transposed [N, L, P], W_UV [N, V, L]) as plain tensors, for expand_context."""
        return self.w_uk_t, self.w_uv


class MLAttention(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.v_dim = config.v_head_dim
        self.latent_dim = config.kv_lora_rank
        self.scale = config.softmax_scale
        self.has_q_lora = config.q_lora_rank is not None
        hidden, heads = config.hidden_size, config.num_attention_heads
        q_out = heads * config.qk_head_dim
        if self.has_q_lora:
            self.q_a_proj = linear(hidden, config.q_lora_rank)
            self.q_a_layernorm = RMSNorm(config.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = linear(config.q_lora_rank, q_out)
        else:
            self.q_proj = linear(hidden, q_out)
        self.kv_a_proj_with_mqa = linear(hidden, config.kv_cache_dim)
        self.kv_a_layernorm = RMSNorm(config.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = KVBProjection(heads, self.latent_dim, self.nope_dim, self.v_dim)
        self.o_proj = linear(heads * self.v_dim, hidden)

    @property
    def kv_b_proj_shape(self) -> tuple[int, int]:
        return (self.num_heads * (self.nope_dim + self.v_dim), self.latent_dim)

    def load_kv_b_proj(self, weight: torch.Tensor) -> None:
        self.kv_b_proj.load(weight)

    def forward(self, x: torch.Tensor, batch: AttentionBatch, kv_cache: LayerCache, cos_sin: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; writes the new tokens' latents into this layer's cache."""
        num_tokens = x.shape[0]
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.has_q_lora else self.q_proj(x)
        q_nope, q_pe = q.view(num_tokens, self.num_heads, -1).split([self.nope_dim, self.rope_dim], -1)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([self.latent_dim, self.rope_dim], -1)
        latent = self.kv_a_layernorm(latent)
        ops.rope_(q_pe, k_pe, batch.positions, cos_sin)
        kv_cache.write(batch.write_slots, torch.cat([latent, k_pe], -1))
        out = batch.attend(self, q_nope, q_pe, kv_cache)  # [T, N, V]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.v_dim))


def expand_context(kv_b: nn.Module, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached latents [S, L] -> per-head keys (their nope part) [N, S, P] and values [N, S, V]."""
    w_uk_t, w_uv = kv_b.halves()
    heads, value_dim = w_uv.shape[0], w_uv.shape[1]
    keys = torch.matmul(latent, w_uk_t)
    values = F.linear(latent, w_uv.flatten(0, 1)).view(-1, heads, value_dim).transpose(0, 1)
    return keys, values


@dataclass
class SpanBatch:
    """The module path's batch: each sequence's context as host-side runs of cache slots.

    A long prefill chunk of one sequence attends in the expanded form; decode steps and short
    chunks (any number of sequences) in the absorbed form. Either way the context goes piece by
    piece, each piece's scores [heads, queries, keys] under max_score_elements.
    """

    positions: torch.Tensor
    write_slots: torch.Tensor
    sequences: list[SequenceSlice]
    expanded: bool = False
    max_score_elements: int = 1 << 26
    # The absorbed form's softmax-weighted latents in one kernel call instead of piece by piece:
    # (q_latent [N, t, L], q_rope [N, t, R'], scale, limits [N * t], cache, context slots [S],
    # out [N, t, L]), where row r attends positions 0..limits[r] (cpu.kernels.latent_attention).
    # Used for many rows.
    latent_attention: Callable[..., None] | None = None

    def attend(self, attn: MLAttention, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        form = self._expanded if self.expanded else self._absorbed
        return form(attn, q_nope.transpose(0, 1), q_pe.transpose(0, 1), cache)

    def _expanded(self, attn: MLAttention, q_nope, q_pe, cache: LayerCache) -> torch.Tensor:
        """q_nope [N, T, P], q_pe [N, T, R] of one sequence -> [T, N, V].

        Keys are expanded per piece; values stay latent (the probabilities times the cached
        latents, one product for all heads), and W_UV is applied once to the chunk's output.
        """
        (seq,) = self.sequences
        queries = (torch.cat([q_nope, q_pe], -1) * attn.scale).to(cache.compute_dtype)  # [N, T, P + R]
        w_uk_t, w_uv = attn.kv_b_proj.halves()  # once per chunk: a quantized kv_b_proj dequantizes them
        heads, nope = attn.num_heads, attn.nope_dim
        w_uk_all = w_uk_t.transpose(0, 1).reshape(attn.latent_dim, heads * nope).to(cache.compute_dtype)  # all heads

        def scores_and_values(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            latent = piece[:, : attn.latent_dim]
            keys = torch.empty(heads, piece.shape[0], queries.shape[-1], dtype=piece.dtype, device=piece.device)
            keys[..., :nope] = torch.mm(latent, w_uk_all).view(-1, heads, nope).transpose(0, 1)  # [N, S, P]
            keys[..., nope:] = piece[:, attn.latent_dim :]  # one rope key shared by all heads
            scores = torch.matmul(queries, keys.transpose(1, 2))  # [N, T, S]
            return scores, latent

        out_latent = self._attend(heads, scores_and_values, seq, cache).to(w_uv.dtype)  # [N, T, L]
        return torch.matmul(out_latent, w_uv.transpose(1, 2)).transpose(0, 1)  # [T, N, V]

    def _absorbed(self, attn: MLAttention, q_nope, q_pe, cache: LayerCache) -> torch.Tensor:
        """q_nope [N, T, P], q_pe [N, T, R] of any number of sequences -> [T, N, V]."""
        # Many rows multiply faster by the dense halves than by kv_b_proj's own (decode) products.
        many = q_nope.shape[1] > 32
        if many:  # in the dtype the cache is read in (float32 halves: ~3 ms a chunk to copy, ~0.35 s saved on AVX2)
            w_uk_t, w_uv = (half.to(cache.compute_dtype) for half in attn.kv_b_proj.halves())
            q_latent = torch.matmul(q_nope.to(w_uk_t.dtype), w_uk_t.transpose(1, 2))  # [N, T, L]
        else:
            q_latent = attn.kv_b_proj.absorb_query(q_nope)
        out_latent = torch.empty_like(q_latent)
        for seq in self.sequences:
            if many and self.latent_attention is not None:  # scaled, concatenated and written in the kernel
                self.latent_attention(q_latent[:, seq.rows], q_pe[:, seq.rows].to(q_latent.dtype), attn.scale,
                                      _causal_limits(seq, attn.num_heads), cache, _context_slots(seq.spans),
                                      out_latent[:, seq.rows])  # fmt: skip
            else:
                for block in _causal_blocks(seq, CAUSAL_BLOCK_ROWS) if many else [seq]:
                    out_latent[:, block.rows] = self._absorbed_in_pieces(attn, q_latent[:, block.rows], q_pe[:, block.rows],
                                                                         block, cache, many).to(out_latent.dtype)  # fmt: skip
        values = torch.matmul(out_latent, w_uv.transpose(1, 2)) if many else attn.kv_b_proj.values(out_latent)
        return values.to(q_nope.dtype).transpose(0, 1)  # [T, N, V]

    def _absorbed_in_pieces(self, attn: MLAttention, q_latent, q_pe, seq: SequenceSlice, cache: LayerCache, many: bool):
        """One sequence's softmax-weighted latents [N, t, L] in torch, context piece by piece."""
        queries = (torch.cat([q_latent, q_pe], -1) * attn.scale).to(cache.compute_dtype)  # [N, t, L + R]
        queries = queries.reshape(-1, queries.shape[-1])

        def scores_and_values(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            if many:
                scores = torch.mm(queries, piece.t())
            else:  # piece @ q.T: for a few queries, the long dimension as rows is ~6x faster on CPU
                scores = torch.mm(piece, queries.t()).t().contiguous()
            return scores.view(attn.num_heads, -1, piece.shape[0]), piece[:, : attn.latent_dim]

        return self._attend(attn.num_heads, scores_and_values, seq, cache)

    def _attend(
        self,
        num_heads: int,
        scores_and_values: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
        seq: SequenceSlice,
        cache: LayerCache,
    ) -> torch.Tensor:
        """Causal softmax attention of a sequence's new tokens over its context, piece by piece.

        scores_and_values(piece of cache) gives scaled scores [N, t, S] and values [.., S, D].
        Each piece gets its own softmax (ops.causal_softmax_, in float32, probabilities in the
        scores' dtype); the pieces' outputs are then weighted by their share of the total softmax
        mass, which is exact. Returns [N, t, D].
        """
        num_queries = seq.rows.stop - seq.rows.start
        piece_tokens = max(1, self.max_score_elements // (num_heads * num_queries))
        pieces = list(_pieces(cache, seq.spans, piece_tokens))
        outputs, log_masses = [], []
        for start, piece in pieces:
            scores, values = scores_and_values(piece)
            log_masses.append(ops.causal_softmax_(scores, seq.first_position, start))
            outputs.append(torch.matmul(scores.to(values.dtype), values))
        if len(pieces) == 1:
            return outputs[0]
        shares = torch.softmax(torch.stack(log_masses), dim=0)  # [pieces, N, t, 1]
        return sum(share * out.float() for share, out in zip(shares, outputs))


def _causal_blocks(seq: SequenceSlice, rows: int) -> Iterator[SequenceSlice]:
    """seq's rows in blocks of `rows`, each over the context up to its own last position."""
    for start in range(seq.rows.start, seq.rows.stop, rows):
        stop = min(start + rows, seq.rows.stop)
        first = seq.first_position + start - seq.rows.start
        yield SequenceSlice(slice(start, stop), first, _truncated(seq.spans, first + stop - start))


def _truncated(spans: list[KVSpan], length: int) -> list[KVSpan]:
    """The first `length` positions of a context's spans."""
    kept = []
    for span in spans:
        if length <= 0:
            break
        kept.append(KVSpan(span.slot, min(span.length, length)))
        length -= span.length
    return kept


def _causal_limits(seq: SequenceSlice, num_heads: int) -> torch.Tensor:
    """The last position each query row [N * t] (head-major) attends: its own."""
    tokens = seq.rows.stop - seq.rows.start
    return torch.arange(seq.first_position, seq.first_position + tokens).repeat(num_heads)


def _context_slots(spans: list[KVSpan]) -> torch.Tensor:
    """The cache slot of every context position, in order."""
    return torch.cat([torch.arange(span.slot, span.slot + span.length) for span in spans])


def _pieces(kv_cache: LayerCache, spans: list[KVSpan], max_tokens: int) -> Iterator[tuple[int, torch.Tensor]]:
    """(first position, cached rows) for consecutive pieces of a context, each <= max_tokens."""
    pos = 0
    for span in spans:
        for offset in range(0, span.length, max_tokens):
            length = min(max_tokens, span.length - offset)
            yield pos, kv_cache.read(span.slot + offset, span.slot + offset + length)
            pos += length
