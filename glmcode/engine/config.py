"""The model configuration, read from a checkpoint's config.json.

Two forms of config.json exist for the same model: the one the real checkpoint ships
(`rope_theta`, `first_k_dense_replace`, `rope_scaling: null`) and the one transformers 5 writes
(`rope_parameters`, `mlp_layer_types`). Both resolve to the same ModelConfig.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from glmcode import options
from glmcode.errors import CheckpointError, UsageError

SUPPORTED_MODEL_TYPES = ("glm4_moe_lite",)

# transformers builds q_a_layernorm / kv_a_layernorm without an eps argument, so they use the
# RMSNorm default (1e-6) rather than rms_norm_eps; we match the reference implementation.
LATENT_NORM_EPS = 1e-6

_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "n_routed_experts",
    "num_experts_per_tok",
    "max_position_embeddings",
)

_DTYPES = {name: getattr(torch, name) for name in options.DTYPES}  # float32, bfloat16, float16


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense MLP width (layers before first_k_dense_replace)
    moe_intermediate_size: int  # width of one routed expert
    num_hidden_layers: int  # main stack only; the MTP block is stored after it
    num_attention_heads: int
    q_lora_rank: int | None  # None: a single q_proj instead of q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    n_group: int
    topk_group: int
    dense_layers: tuple[bool, ...]  # per main layer: True = dense MLP, False = MoE
    rms_norm_eps: float
    rope_theta: float
    rope_dim: int  # rotary dims inside the qk_rope_head_dim slice (partial_rotary_factor)
    max_position_embeddings: int
    tie_word_embeddings: bool
    num_nextn_predict_layers: int
    eos_token_ids: tuple[int, ...]
    dtype: torch.dtype | None  # the checkpoint's dtype, None when config.json does not say

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    @property
    def kv_cache_dim(self) -> int:
        """Values cached per token per layer: normalized latent + roped shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @classmethod
    def from_dir(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path} not found: not a model checkpoint directory")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{path} is not valid JSON: {exc}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} must hold a JSON object")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], *, source: str = "config.json") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise CheckpointError(
                f"{source}: unsupported model_type {model_type!r} "
                f"(glmcode runs {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        for field in _REQUIRED_FIELDS:
            if raw.get(field) is None:
                raise CheckpointError(f"{source}: required field {field!r} is missing")
        if raw.get("hidden_act", "silu") != "silu":
            raise CheckpointError(f"{source}: unsupported hidden_act {raw['hidden_act']!r}")

        num_layers = int(raw["num_hidden_layers"])
        rope_theta, rope_dim = _read_rope(raw, int(raw["qk_rope_head_dim"]), source)
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            moe_intermediate_size=int(raw["moe_intermediate_size"]),
            num_hidden_layers=num_layers,
            num_attention_heads=int(raw["num_attention_heads"]),
            q_lora_rank=int(raw["q_lora_rank"]) if raw.get("q_lora_rank") else None,
            kv_lora_rank=int(raw["kv_lora_rank"]),
            qk_nope_head_dim=int(raw["qk_nope_head_dim"]),
            qk_rope_head_dim=int(raw["qk_rope_head_dim"]),
            v_head_dim=int(raw["v_head_dim"]),
            n_routed_experts=int(raw["n_routed_experts"]),
            n_shared_experts=int(raw.get("n_shared_experts", 1)),
            num_experts_per_tok=int(raw["num_experts_per_tok"]),
            routed_scaling_factor=float(raw.get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(raw.get("norm_topk_prob", True)),
            n_group=int(raw.get("n_group", 1)),
            topk_group=int(raw.get("topk_group", 1)),
            dense_layers=_read_dense_layers(raw, num_layers, source),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=rope_theta,
            rope_dim=rope_dim,
            max_position_embeddings=int(raw["max_position_embeddings"]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            num_nextn_predict_layers=int(raw.get("num_nextn_predict_layers", 0)),
            eos_token_ids=_read_eos(raw.get("eos_token_id")),
            dtype=_DTYPES.get(raw.get("dtype") or raw.get("torch_dtype") or ""),
        )


def resolve_dtype(dtype: str | torch.dtype | None, config: ModelConfig) -> torch.dtype:
    """The compute dtype: an explicit choice, else the checkpoint's, else bfloat16."""
    if dtype is None:
        return config.dtype or torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise UsageError(f"unsupported dtype {dtype}; use one of {', '.join(_DTYPES)}")
        return dtype
    if dtype not in _DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r}; use one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _read_rope(raw: dict[str, Any], rope_head_dim: int, source: str) -> tuple[float, int]:
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or {}
    rope_type = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type != "default":
        raise CheckpointError(f"{source}: unsupported rope type {rope_type!r} (only default rope)")
    theta = params.get("rope_theta", raw.get("rope_theta"))
    if theta is None:
        raise CheckpointError(f"{source}: required field 'rope_theta' is missing")
    factor = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    rope_dim = int(rope_head_dim * factor)
    if rope_dim != rope_head_dim:
        raise CheckpointError(f"{source}: partial_rotary_factor {factor} is not supported")
    return float(theta), rope_dim


def _read_dense_layers(raw: dict[str, Any], num_layers: int, source: str) -> tuple[bool, ...]:
    layer_types = raw.get("mlp_layer_types")
    if layer_types is not None:
        if len(layer_types) < num_layers or any(t not in ("dense", "sparse") for t in layer_types):
            raise CheckpointError(f"{source}: mlp_layer_types must list 'dense'/'sparse' per layer")
        return tuple(t == "dense" for t in layer_types[:num_layers])
    first_moe = int(raw.get("first_k_dense_replace", 1))
    return tuple(i < first_moe for i in range(num_layers))


def _read_eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)
