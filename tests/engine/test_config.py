"""config.json in both forms resolves to one ModelConfig; bad configs name the problem."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.config import ModelConfig, resolve_dtype
from glmcode.errors import CheckpointError, UsageError

REAL = {  # the real checkpoint's config.json (abridged to the fields that matter)
    "architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
    "eos_token_id": [154820, 154827, 154829], "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 10240, "max_position_embeddings": 202752, "moe_intermediate_size": 1536,
    "topk_method": "noaux_tc", "norm_topk_prob": True, "num_attention_heads": 20, "n_group": 1,
    "topk_group": 1, "n_routed_experts": 64, "n_shared_experts": 1, "routed_scaling_factor": 1.8,
    "num_experts_per_tok": 4, "first_k_dense_replace": 1, "num_hidden_layers": 47,
    "num_key_value_heads": 20, "num_nextn_predict_layers": 1, "partial_rotary_factor": 1.0,
    "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000, "tie_word_embeddings": False,
    "dtype": "bfloat16", "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64, "v_head_dim": 256, "vocab_size": 154880,
}  # fmt: skip


def transformers_form(raw: dict) -> dict:
    out = {k: v for k, v in raw.items() if k not in ("rope_theta", "rope_scaling", "first_k_dense_replace")}
    out["rope_parameters"] = {"rope_type": "default", "rope_theta": raw["rope_theta"]}
    out["mlp_layer_types"] = ["dense"] + ["sparse"] * (raw["num_hidden_layers"] - 1)
    return out


def test_real_config_resolves_to_the_documented_shapes():
    config = ModelConfig.from_dict(REAL)
    assert config.qk_head_dim == 256 and config.softmax_scale == 0.0625
    assert config.kv_cache_dim == 576
    assert config.dense_layers == (True,) + (False,) * 46
    assert config.rope_theta == 1e6 and config.rope_dim == 64
    assert config.eos_token_ids == (154820, 154827, 154829)
    assert config.dtype == torch.bfloat16


def test_both_config_forms_resolve_identically():
    assert ModelConfig.from_dict(transformers_form(REAL)) == ModelConfig.from_dict(REAL)


def test_first_k_dense_replace_and_layer_types_agree():
    two_dense = ModelConfig.from_dict(REAL | {"first_k_dense_replace": 2})
    assert two_dense.dense_layers[:3] == (True, True, False)
    types = ["dense", "dense"] + ["sparse"] * 45
    assert ModelConfig.from_dict(transformers_form(REAL) | {"mlp_layer_types": types}) == two_dense


def test_no_q_lora_rank_means_a_plain_q_proj():
    assert ModelConfig.from_dict(REAL | {"q_lora_rank": None}).q_lora_rank is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"model_type": "deepseek_v3"}, "unsupported model_type 'deepseek_v3'"),
        ({"qk_rope_head_dim": None}, "'qk_rope_head_dim' is missing"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4}}, "unsupported rope type 'yarn'"),
        ({"rope_theta": None}, "'rope_theta' is missing"),
        ({"hidden_act": "gelu"}, "unsupported hidden_act"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_bad_configs_name_the_field(change, message):
    with pytest.raises(CheckpointError, match=message):
        ModelConfig.from_dict(REAL | change)


def test_dtype_resolution():
    config = ModelConfig.from_dict(REAL)
    assert resolve_dtype(None, config) == torch.bfloat16
    assert resolve_dtype("float32", config) == torch.float32
    assert resolve_dtype(torch.float16, config) == torch.float16
    with pytest.raises(UsageError, match="int8"):
        resolve_dtype("int8", config)
