"""The CUDA path: the model's forward pass rebuilt on the GPU kernels, decode replayed from graphs.

The engine's own modules (model.py, attention.py, moe.py) are written for the CPU: per-sequence
loops, host-side routing, shapes that change every step. On a GPU a decode step is instead
hundreds of small kernels, and launching them costs more than running them. This runner keeps the
same weights (it re-points a few module parameters at views of fused tensors, so nothing is held
twice) and runs:

- decode: one query per sequence, attention by `mla_decode` over the paged latent cache (block
  tables + seq_lens as tensors), routing in one kernel after the router's GEMV (`route_topk`), MoE
  by `fused_moe` with the shared expert folded in as one more always-on expert, fused rms_norm /
  add_rms_norm / rope / silu_mul. The whole step, embedding to logits, reads its inputs from
  static buffers, so it is captured once per batch-size bucket in a CUDA graph
  (cuda_graphs.GraphedStep) and replayed. Rows past the real batch decode a dummy token with
  seq_len 0 and write their latent to a scratch slot that no sequence owns.
- prefill, chunk by chunk: the expanded form through SDPA over the sequence's whole context, or,
  for chunks too short to amortize expanding that context, each new token as its own `mla_decode`
  query (its seq_len stops at its own position, which is the causal mask). Prefill runs eagerly.

Off CUDA the same code runs on CPU tensors: `glmcode.engine.ops` answers with its PyTorch
references, and GraphedStep runs the padded step eagerly. That is how the tests check this path
against the CPU engine (LLM(..., kernel_path=True)); only graph capture and replay need a GPU.

An fp8 latent cache (float8_e4m3fn values, one float32 scale per token and layer) is quantized on
write and read with its scales by both attention forms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.bias import causal_lower_right

from glmcode.engine import ops
from glmcode.engine.config import LATENT_NORM_EPS
from glmcode.engine.cuda.graphs import DEFAULT_BUCKETS, GraphedStep
from glmcode.engine.cuda.reference import with_shared_expert
from glmcode.engine.kv_cache import KVCache, LayerCache
from glmcode.engine.sequence import Sequence
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import KVBProjection, MLAttention
from glmcode.engine.model.layers import GatedMLP
from glmcode.engine.model.moe import MoE, RoutedExperts
from glmcode.errors import UsageError

# A prefill chunk this short attends in the absorbed form, each token a decode query reading the
# cached context once. Longer chunks expand the context to per-head keys and values instead, which
# costs ~9 MFLOP per context token and layer whatever the chunk size; on an H100/H200 the two
# meet at roughly 60-80 queries.
ABSORBED_PREFILL_MAX_TOKENS = 64


@dataclass(frozen=True)
class PagedQueries:
    """One query row per entry, attending over its first seq_lens[i] cached tokens (absorbed)."""

    block_tables: torch.Tensor  # [B, max_blocks] int32
    seq_lens: torch.Tensor  # [B] int32


@dataclass(frozen=True)
class ExpandedContext:
    """The new tokens of one sequence are its last ones; they attend over all `length` tokens."""

    block_table: torch.Tensor  # [blocks covering length] int32 (long for indexing)
    length: int


class KernelAttention:
    """MLA over the paged latent cache, through the kernels; weights shared with `attn`."""

    def __init__(self, attn: MLAttention, q_lora_rank: int | None):
        self.num_heads, self.nope_dim, self.rope_dim = attn.num_heads, attn.nope_dim, attn.rope_dim
        self.latent_dim, self.v_dim, self.scale = attn.latent_dim, attn.v_dim, attn.scale
        self.q_lora_rank = q_lora_rank
        first = attn.q_a_proj if q_lora_rank is not None else attn.q_proj
        self.w_a = fuse_linears(first, attn.kv_a_proj_with_mqa)  # x -> [q_a or q | latent | k_pe]
        self.q_a_norm = attn.q_a_layernorm.weight if q_lora_rank is not None else None
        self.w_q_b = attn.q_b_proj.weight if q_lora_rank is not None else None
        self.kv_a_norm = attn.kv_a_layernorm.weight
        w_uk_t, self.w_uv = attn.kv_b_proj.halves()  # [N, L, P], [N, V, L]
        self.w_uk = w_uk_t.transpose(1, 2)  # [N, P, L]
        self.w_uv_t = self.w_uv.transpose(1, 2)  # [N, L, V]
        self.w_o = attn.o_proj.weight

    def __call__(self, x, positions, write_slots, cache: LayerCache, attend, cos_sin) -> torch.Tensor:
        tokens = x.shape[0]
        projected = F.linear(x, self.w_a)
        q_part, kv_a = projected.split([projected.shape[1] - self.latent_dim - self.rope_dim,
                                        self.latent_dim + self.rope_dim], -1)  # fmt: skip
        if self.q_lora_rank is not None:
            q_part = F.linear(ops.rms_norm(q_part, self.q_a_norm, LATENT_NORM_EPS), self.w_q_b)
        q = q_part.view(tokens, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q[..., : self.nope_dim], q[..., self.nope_dim :]
        latent = ops.rms_norm(kv_a[:, : self.latent_dim], self.kv_a_norm, LATENT_NORM_EPS)
        k_pe = kv_a[:, self.latent_dim :]
        # The de-interleaved output layout is the one the CPU path caches (layers.apply_rotary).
        ops.rope_interleaved_(q_pe, k_pe, positions, cos_sin, deinterleave=True)
        cache.write(write_slots, torch.cat([latent, k_pe], -1))

        if isinstance(attend, PagedQueries):
            out = self._absorbed(q_nope, q_pe, cache, attend)
        else:
            out = self._expanded(q_nope, q_pe, cache, attend)
        return F.linear(out.reshape(tokens, self.num_heads * self.v_dim), self.w_o)

    def _absorbed(self, q_nope, q_pe, cache: LayerCache, queries: PagedQueries) -> torch.Tensor:
        """[B, N, P] + [B, N, R] -> [B, N, V]: W_UK folded into the query, W_UV applied after."""
        q_latent = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [B, N, L]
        out_latent = ops.mla_decode(
            q_latent, q_pe, cache.paged, queries.block_tables, queries.seq_lens, self.scale, cache.paged_scales
        )
        return torch.bmm(out_latent.transpose(0, 1), self.w_uv_t).transpose(0, 1)

    def _expanded(self, q_nope, q_pe, cache: LayerCache, context: ExpandedContext) -> torch.Tensor:
        """[T, N, P] + [T, N, R] of the context's last T tokens -> [T, N, V], through SDPA.

        Keys and values are made token-major ([S, N, D], one GEMM each) and handed to SDPA as
        transposed views: about 4 GB at a 200K context, so a full context prefills beside the
        weights.
        """
        rows = cache.gather(context.block_table, context.length).to(q_nope.dtype)  # [S, L + R]
        latent, k_pe = rows.split([self.latent_dim, self.rope_dim], -1)
        length, heads = context.length, self.num_heads
        k_nope = F.linear(latent, self.w_uk.flatten(0, 1)).view(length, heads, self.nope_dim)
        keys = torch.cat([k_nope, k_pe[:, None].expand(-1, heads, -1)], -1).transpose(0, 1)  # [N, S, P + R]
        del k_nope
        values = F.linear(latent, self.w_uv.flatten(0, 1)).view(length, heads, self.v_dim).transpose(0, 1)
        queries = torch.cat([q_nope, q_pe], -1).transpose(0, 1)  # [N, T, P + R]
        num_queries = queries.shape[1]
        if num_queries == length:
            mask, causal = None, True
        else:  # queries are the last T positions: causal, aligned to the bottom-right corner
            mask, causal = causal_lower_right(num_queries, length), False
        out = F.scaled_dot_product_attention(
            queries[None], keys[None], values[None], attn_mask=mask, is_causal=causal, scale=self.scale
        )
        return out[0].transpose(0, 1)


class KernelMoE:
    """Router GEMV in float32, routing in one kernel, then one fused_moe call; the shared expert
    rides along as expert E."""

    def __init__(self, moe: MoE):
        self.router = moe.gate
        # Group-limited routing (n_group > 1; not GLM-4.7-Flash's) stays on the Router module.
        self.fused_routing = self.router.n_group == 1
        experts, shared = moe.experts, moe.shared_experts
        self.num_experts = experts.gate_up_proj.shape[0]
        self.fold_shared = shared.width == experts.down_proj.shape[2]
        if self.fold_shared:
            self.w13, self.w2 = stack_with_shared_expert(moe)
            self.shared = None
        else:  # a wider shared expert (n_shared_experts > 1) runs as its own MLP
            self.w13, self.w2 = experts.gate_up_proj, experts.down_proj
            self.shared = KernelMLP(shared)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        shared_id = self.num_experts if self.fold_shared else None
        if self.fused_routing:
            router = self.router
            logits = F.linear(x.float(), router.weight)
            expert_ids, weights = ops.route_topk(
                logits, router.e_score_correction_bias, router.top_k, router.scaling, router.normalize, shared_id
            )
        else:
            weights, expert_ids = self.router(x)
            if shared_id is not None:
                expert_ids, weights = with_shared_expert(expert_ids, weights, shared_id)
        out = ops.fused_moe(x, self.w13, self.w2, expert_ids, weights)
        return out if self.shared is None else out + self.shared(x)


class KernelMLP:
    def __init__(self, mlp: GatedMLP):
        self.w_gate_up, self.w_down = mlp.gate_up_proj.weight, mlp.down_proj.weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(ops.silu_mul(F.linear(x, self.w_gate_up)), self.w_down)


class CudaRunner:
    """Prefill chunks and batched decode steps of the model through the GPU kernels."""

    def __init__(self, model: GlmMoeLite, kv_cache: KVCache, *, max_batch: int, max_context: int, scratch_slot: int):
        config = model.config
        check_plain_weights(model)
        if kv_cache.data.is_cuda:
            check_triton_dims(config.kv_lora_rank, config.qk_rope_head_dim)
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = kv_cache.data.device
        backbone = model.model
        self.embed = backbone.embed_tokens.weight
        self.final_norm = backbone.norm.weight
        self.lm_head = model.lm_head.weight
        self.eps = config.rms_norm_eps
        self.layers = []
        for index, layer in enumerate(backbone.layers):
            mlp = KernelMLP(layer.mlp) if isinstance(layer.mlp, GatedMLP) else KernelMoE(layer.mlp)
            self.layers.append((
                layer.input_layernorm.weight, KernelAttention(layer.self_attn, config.q_lora_rank),
                layer.post_attention_layernorm.weight, mlp, kv_cache.layers[index],
            ))  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the replaced expert tensors: cached blocks too small for reuse
        cos, sin = model.rotary.cos_sin(torch.arange(max_context, device=self.device), torch.float32)
        self.cos_sin = torch.cat([cos, sin], -1).contiguous()  # [max_context, R], as ops.rope_cos_sin lays it out
        self.graphed = GraphedStep(
            self._decode_step,
            self._static_decode_inputs(max_batch, -(-max_context // self.block_size), scratch_slot),
            pad_values={"write_slots": scratch_slot},
            buckets=batch_buckets(max_batch),
        )
        self.use_graphs = self.device.type == "cuda"

    # ----- the two entry points -----

    def prefill(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        """Runs positions [start, end) of a sequence; returns their final-normed hidden states."""
        num_tokens = end - start
        block_table = self._int_tensor(seq.block_table[: -(-end // self.block_size)], torch.int32)
        if num_tokens <= ABSORBED_PREFILL_MAX_TOKENS:
            attend = PagedQueries(
                block_table.expand(num_tokens, -1),
                torch.arange(start + 1, end + 1, dtype=torch.int32, device=self.device),
            )
        else:
            attend = ExpandedContext(block_table.long(), end)
        return self.forward(
            self._int_tensor(seq.token_ids[start:end]),
            torch.arange(start, end, device=self.device),
            self._int_tensor(self.kv_cache.slots(seq, start, end)),
            attend,
        )

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        """Feeds each sequence's last token; returns float32 logits [len(seqs), vocab]."""
        if self.use_graphs and not self.graphed.graphs:
            self.graphed.capture()
        return self.graphed(self.decode_inputs(seqs)).clone()  # replay reuses the output buffer

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()

    def decode_eager(self, seqs: list[Sequence]) -> torch.Tensor:
        """decode() without the graphs, on the same padded buffers (profiling, checks)."""
        return self.graphed.run_eager(self.decode_inputs(seqs)).clone()

    def decode_inputs(self, seqs: list[Sequence]) -> dict[str, torch.Tensor]:
        """Host tensors for one decode step; GraphedStep copies them into its static buffers."""
        size = self.block_size
        last = [len(s) - 1 for s in seqs]
        width = max(len(s.block_table) for s in seqs)
        tables = [s.block_table + [0] * (width - len(s.block_table)) for s in seqs]
        return {
            "token_ids": torch.tensor([s.token_ids[-1] for s in seqs]),
            "positions": torch.tensor(last),
            "write_slots": torch.tensor([s.block_table[p // size] * size + p % size for s, p in zip(seqs, last)]),
            "block_tables": torch.tensor(tables, dtype=torch.int32),
            "seq_lens": torch.tensor([len(s) for s in seqs], dtype=torch.int32),
        }

    # ----- the forward pass -----

    def forward(self, token_ids, positions, write_slots, attend) -> torch.Tensor:
        """token_ids [T] -> final-normed hidden [T, hidden]; writes the new tokens' latents."""
        hidden = F.embedding(token_ids, self.embed)
        residual = None
        for input_norm, attention, post_norm, mlp, cache in self.layers:
            if residual is None:
                normed, residual = ops.rms_norm(hidden, input_norm, self.eps), hidden
            else:
                normed, residual = ops.add_rms_norm(hidden, residual, input_norm, self.eps)
            hidden = attention(normed, positions, write_slots, cache, attend, self.cos_sin)
            normed, residual = ops.add_rms_norm(hidden, residual, post_norm, self.eps)
            hidden = mlp(normed)
        return ops.add_rms_norm(hidden, residual, self.final_norm, self.eps)[0]

    def _decode_step(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The graph-captured step: no host syncs, every shape fixed by the bucket."""
        attend = PagedQueries(inputs["block_tables"], inputs["seq_lens"])
        hidden = self.forward(inputs["token_ids"], inputs["positions"], inputs["write_slots"], attend)
        return self.logits(hidden)

    def _static_decode_inputs(self, max_batch: int, max_blocks: int, scratch_slot: int) -> dict[str, torch.Tensor]:
        """The static buffers, holding pad rows: token 0 at position 0, no context, scratch write."""
        zeros = dict(device=self.device, dtype=torch.long)
        return {
            "token_ids": torch.zeros(max_batch, **zeros),
            "positions": torch.zeros(max_batch, **zeros),
            "write_slots": torch.full((max_batch,), scratch_slot, **zeros),
            "block_tables": torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=self.device),
            "seq_lens": torch.zeros(max_batch, dtype=torch.int32, device=self.device),
        }

    def _int_tensor(self, values: list[int], dtype: torch.dtype = torch.long) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)


def batch_buckets(max_batch: int) -> tuple[int, ...]:
    """The captured batch sizes: the default buckets below max_batch, then max_batch itself."""
    return tuple(b for b in DEFAULT_BUCKETS if b < max_batch) + (max_batch,)


def fuse_linears(*modules: nn.Linear) -> torch.Tensor:
    """One weight [sum of out, in] for linears that read the same input; the modules keep views."""
    fused = torch.cat([module.weight for module in modules])
    start = 0
    for module in modules:
        rows = module.weight.shape[0]
        module.weight = nn.Parameter(fused[start : start + rows], requires_grad=False)
        start += rows
    return fused


def stack_with_shared_expert(moe: MoE) -> tuple[torch.Tensor, torch.Tensor]:
    """[E + 1, 2I, H] and [E + 1, H, I] stacks with the shared expert last; modules keep views.

    Built one layer at a time, so the extra memory is one layer's experts, briefly.
    """
    experts, shared = moe.experts, moe.shared_experts
    w13 = torch.cat([experts.gate_up_proj, shared.gate_up_proj.weight[None]])
    experts.gate_up_proj = nn.Parameter(w13[:-1], requires_grad=False)
    shared.gate_up_proj.weight = nn.Parameter(w13[-1], requires_grad=False)
    w2 = torch.cat([experts.down_proj, shared.down_proj.weight[None]])
    experts.down_proj = nn.Parameter(w2[:-1], requires_grad=False)
    shared.down_proj.weight = nn.Parameter(w2[-1], requires_grad=False)
    return w13, w2


def check_triton_dims(latent_dim: int, rope_dim: int) -> None:
    """The Triton MLA kernel multiplies [heads, dim] tiles with tl.dot: powers of two, at least 16."""
    for name, dim in (("kv_lora_rank", latent_dim), ("qk_rope_head_dim", rope_dim)):
        if dim < 16 or dim & (dim - 1):
            raise UsageError(f"{name} = {dim}: the CUDA kernel path needs a power of two >= 16")


def check_plain_weights(model: GlmMoeLite) -> None:
    """The kernel path multiplies plain weight tensors; quantized modules stay on the CPU path."""
    for name, module in model.named_modules():
        plain = (
            type(module) is KVBProjection if name.endswith(".kv_b_proj")
            else isinstance(module, nn.Linear) if name.endswith(("_proj", "lm_head"))
            else type(module) is RoutedExperts if name.endswith(".experts")
            else True
        )  # fmt: skip
        if not plain:
            raise UsageError(f"{name} holds quantized weights: quantized models run on the CPU path only")
