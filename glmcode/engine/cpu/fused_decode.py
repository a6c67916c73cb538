"""A decode step of one sequence on CPU as one call: the model's fused C++ plan.

Run module by module, a decode step is a few thousand small torch ops around the
weight-streaming matrix-vector products; on a 2-core machine their overhead and the fork/join
of each kernel's threads cost as much as reading the weights. ``cpu_decode.cpp`` runs
the whole step (all layers, the final norm and lm_head) inside one parallel region instead.

``FusedDecoder.for_model`` flattens the model into the plan the C++ side reads: the very
buffers the modules hold (views, nothing copied but the small norm weights), for int4 / int8
weights on our kernels (AVX-512 or AVX2) and for bfloat16 weights on a CPU with AVX512_BF16,
over a bfloat16, float32 or int8 latent cache. It returns None when the model is not one the
plan runs (float32 weights, the aten fallback kernels, an fp8 cache...): the LLM then decodes on
its modules as before. Prefill always runs on the modules, which batch a chunk's tokens through
each weight.
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

from glmcode.engine.config import LATENT_NORM_EPS
from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.features import has_bf16_dot
from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.model.attention import KVBProjection
from glmcode.engine.model.layers import GatedMLP, Linear
from glmcode.engine.model.moe import MoE, RoutedExperts
from glmcode.engine.quant.experts import QuantizedExperts, StackedInt4Experts
from glmcode.engine.quant.linear import Int4Linear, Int8KVBProjection, Int8Linear

log = logging.getLogger(__name__)


class Unsupported(Exception):
    """The model has a part the fused plan does not run."""


class FusedDecoder:
    def __init__(self, model: GlmMoeLite, *, allow_amx: bool = True):
        """Raises Unsupported when some part of ``model`` is not one the plan runs.

        allow_amx: attend on AMX tiles where the CPU has them (bf16 cache); False keeps the
        AVX-512 attention (for comparing the two).
        """
        self.embedding = model.model.embed_tokens.weight
        plan = _PlanWriter(model, allow_amx)
        self.plan = torch.classes.glmcode_cpu.DecodePlan(plan.tensors, plan.ints, plan.floats)

    @classmethod
    def for_model(cls, model: GlmMoeLite, kv_cache: KVCache) -> FusedDecoder | None:
        """The fused decoder for ``model`` over ``kv_cache``, or None.

        ``GLMCODE_FUSED_DECODE=0`` turns it off (to compare against the module path).
        """
        if os.environ.get("GLMCODE_FUSED_DECODE", "1") == "0":
            return None
        if kv_cache.data.device.type != "cpu" or _bits(model.lm_head) is None:
            return None
        if kv_cache.dtype not in (torch.bfloat16, torch.float32, torch.int8):
            return None
        try:
            return cls(model)
        except Unsupported:
            return None
        except RuntimeError as exc:  # the plan refused the model: decode on the modules instead
            log.warning("fused CPU decode unavailable, decoding op by op: %s", str(exc).splitlines()[0])
            return None

    def logits(self, token_id: int, position: int, block_table: list[int], kv_cache: KVCache) -> torch.Tensor:
        """float32 logits [1, vocab] for ``token_id`` at ``position``; writes its latent into
        the cache slot that ``block_table`` gives that position."""
        table = torch.tensor(block_table[: position // kv_cache.block_size + 1], dtype=torch.long)
        scales = kv_cache.scales if kv_cache.scales is not None else _NO_SCALES
        return self.plan.step(self.embedding[token_id], position, table, kv_cache.block_size, kv_cache.data, scales)[None]


_NO_SCALES = torch.empty(0)


def _bits(module: nn.Module) -> int | None:
    """4 / 8 / 16: how the plan runs this projection; None: it cannot."""
    if isinstance(module, (Int4Linear, Int8Linear)):
        # on our kernels, which implies the extension (and so the plan) is built
        return (4 if isinstance(module, Int4Linear) else 8) if module.kernel == "glmcode" else None
    return 16 if _bf16_runs(module.weight) else None


def _bf16_runs(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and has_bf16_dot() and cpu_kernels.avx512_available()


class _PlanWriter:
    """The flat description cpu_decode.cpp's DecodePlan reads, in its order."""

    def __init__(self, model: GlmMoeLite, allow_amx: bool):
        config = model.config
        if config.rope_dim != config.qk_rope_head_dim or config.hidden_size % 16 or config.kv_lora_rank % 32:
            raise Unsupported("shapes")
        self.tensors: list[torch.Tensor] = []
        self.ints: list[int] = [
            config.hidden_size, config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim,
            config.v_head_dim, config.kv_lora_rank, int(config.q_lora_rank is not None), config.n_routed_experts,
            config.num_experts_per_tok, config.n_group, config.topk_group, int(config.norm_topk_prob),
            model.lm_head.out_features, config.num_hidden_layers, int(allow_amx),
        ]  # fmt: skip
        self.floats = [config.rms_norm_eps, LATENT_NORM_EPS, config.softmax_scale, config.routed_scaling_factor]
        self.tensors.append(model.rotary.inv_freq.float().contiguous())
        self.norm(model.model.norm)
        self.linear(model.lm_head)
        for layer in model.model.layers:
            self.layer(layer, config.q_lora_rank is not None)

    def layer(self, layer: nn.Module, q_lora: bool) -> None:
        attention = layer.self_attn
        self.norm(layer.input_layernorm)
        self.norm(layer.post_attention_layernorm)
        if q_lora:
            self.linear(attention.q_a_proj)
            self.norm(attention.q_a_layernorm)
            self.linear(attention.q_b_proj)
        else:
            self.linear(attention.q_proj)
        self.linear(attention.kv_a_proj_with_mqa)
        self.norm(attention.kv_a_layernorm)
        self.heads(attention.kv_b_proj)
        self.linear(attention.o_proj)
        mlp = layer.mlp
        if isinstance(mlp, GatedMLP):
            self.ints.append(1)
            self.gated(mlp)
        elif isinstance(mlp, MoE):
            self.ints.append(0)
            self.gated(mlp.shared_experts)
            self.tensors += [mlp.gate.weight.float().contiguous(), mlp.gate.e_score_correction_bias.float().contiguous()]
            self.experts(mlp.experts)
        else:
            raise Unsupported(type(mlp).__name__)

    def gated(self, mlp: GatedMLP) -> None:
        self.linear(mlp.gate_up_proj)
        self.linear(mlp.down_proj)

    def norm(self, module: nn.Module) -> None:
        self.tensors.append(module.weight.detach().float().contiguous())

    def linear(self, module: nn.Module) -> None:
        bits = _bits(module) if isinstance(module, (Int4Linear, Int8Linear, Linear)) else None
        if bits == 4:
            self.weight(4, module.out_features, module.group_size, module.packed, module.scales, module.zeros)
        elif bits == 8:
            self.weight(8, module.out_features, module.group, module.packed, module.scales, module.sums)
        elif bits == 16:
            self.rows(module.weight)
        else:
            raise Unsupported(type(module).__name__)

    def rows(self, weight: torch.Tensor) -> None:
        """A bfloat16 weight [out, in] as stored."""
        if not _bf16_runs(weight):
            raise Unsupported(str(weight.dtype))
        self.weight(16, weight.shape[0], weight.shape[1], weight)

    def weight(self, bits: int, rows: int, group: int, *tensors: torch.Tensor) -> None:
        self.ints += [bits, rows, group]
        self.tensors += [t.contiguous() for t in tensors]

    def heads(self, kv_b: nn.Module) -> None:
        if isinstance(kv_b, KVBProjection):
            for half in (kv_b.w_uk_t, kv_b.w_uv):  # [heads, latent, nope] and [heads, v, latent]
                for head in half:
                    self.rows(head)
            return
        if not isinstance(kv_b, Int8KVBProjection):
            raise Unsupported(type(kv_b).__name__)
        for name in ("uk", "uv"):
            packed, scales, sums = (getattr(kv_b, f"{name}_{part}") for part in ("packed", "scales", "sums"))
            for head in range(packed.shape[0]):
                self.weight(8, getattr(kv_b, f"{name}_rows"), getattr(kv_b, f"{name}_group"), packed[head], scales[head], sums[head])

    def experts(self, experts: nn.Module) -> None:
        if isinstance(experts, StackedInt4Experts):
            for prefix, group in (("up", experts.up_group), ("down", experts.down_group)):
                packed, scales, zeros = (getattr(experts, f"{prefix}_{part}") for part in ("packed", "scales", "zeros"))
                rows = packed.shape[1] * cpu_kernels.TILE if prefix == "up" else experts.hidden_size
                for e in range(experts.num_experts):
                    self.weight(4, rows, group, packed[e], scales[e], zeros[e])
        elif isinstance(experts, QuantizedExperts):
            for modules in (experts.gate_up, experts.down):
                for module in modules:
                    self.linear(module)
        elif isinstance(experts, RoutedExperts):
            for stacked in (experts.gate_up_proj, experts.down_proj):
                for weight in stacked:
                    self.rows(weight)
        else:
            raise Unsupported(type(experts).__name__)
