"""GLM-4.7-Flash (Glm4MoeLiteForCausalLM): embeddings, MLA + MoE decoder layers, untied head.

Module names mirror the checkpoint's tensor names (`model.layers.3.self_attn.q_a_proj`), so
loading is a name lookup. Two differences: gate_proj and up_proj are stored as one
`gate_up_proj`, and routed experts are stacked per layer.
"""

from __future__ import annotations

import torch
from torch import nn

from glmcode.engine.config import ModelConfig
from glmcode.engine.kv_cache import KVCache, LayerCache
from glmcode.engine.model.attention import AttentionBatch, MLAttention
from glmcode.engine.model.layers import GatedMLP, RMSNorm, Rotary, linear
from glmcode.engine.model.moe import MoE, Router


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, dense: bool):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size) if dense else MoE(config)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, batch: AttentionBatch, kv_cache: LayerCache,
                cos_sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """(this layer's output, the residual stream before it): the next norm adds the two."""
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, batch, kv_cache, cos_sin)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class Backbone(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, dense) for dense in config.dense_layers)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GlmMoeLite(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.model = Backbone(config)
        self.lm_head = linear(config.hidden_size, config.vocab_size)
        self.rotary = Rotary(config.rope_dim, config.rope_theta, config.max_position_embeddings)

    def forward(self, input_ids: torch.Tensor, batch: AttentionBatch, kv_cache: KVCache) -> torch.Tensor:
        """input_ids [T] -> final-normed hidden states [T, hidden]; the new tokens' latents are
        written into the cache."""
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rotary.cos_sin(x.device)
        residual = None
        for layer, layer_cache in zip(self.model.layers, kv_cache.layers):
            x, residual = layer(x, residual, batch, layer_cache, cos_sin)
        return self.model.norm(x, residual)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()


def build_model(config: ModelConfig, dtype: torch.dtype, device: torch.device | str) -> GlmMoeLite:
    """The model with uninitialized weights, allocated once in its final dtype and device.

    Routers stay float32 (the reference keeps them so); everything else is `dtype`.
    """
    with torch.device("meta"):
        model = GlmMoeLite(config)
    model.to(dtype)
    for module in model.modules():
        if isinstance(module, Router):
            module.float()
    model.to_empty(device=device)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)
