"""A small float checkpoint in the real GLM-4.7-Flash tensor layout (random values)."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

SMALL = {
    "model_type": "glm4_moe_lite",
    "hidden_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "q_lora_rank": 64,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": 16,
    "v_head_dim": 32,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "vocab_size": 320,
    "dtype": "bfloat16",
}


def checkpoint_tensors(c: dict) -> dict[str, torch.Tensor]:
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    tensors = {"model.embed_tokens.weight": (c["vocab_size"], h), "lm_head.weight": (c["vocab_size"], h), "model.norm.weight": (h,)}
    for layer in range(c["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        tensors |= {
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
            p + "self_attn.q_a_proj.weight": (c["q_lora_rank"], h),
            p + "self_attn.q_a_layernorm.weight": (c["q_lora_rank"],),
            p + "self_attn.q_b_proj.weight": (heads * qk, c["q_lora_rank"]),
            p + "self_attn.kv_a_proj_with_mqa.weight": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            p + "self_attn.kv_a_layernorm.weight": (c["kv_lora_rank"],),
            p + "self_attn.kv_b_proj.weight": (heads * (c["qk_nope_head_dim"] + c["v_head_dim"]), c["kv_lora_rank"]),
            p + "self_attn.o_proj.weight": (h, heads * c["v_head_dim"]),
        }
        if layer < c["first_k_dense_replace"]:
            inter = c["intermediate_size"]
            tensors |= {p + f"mlp.{n}_proj.weight": (inter, h) for n in ("gate", "up")} | {p + "mlp.down_proj.weight": (h, inter)}
            continue
        inter = c["moe_intermediate_size"]
        tensors |= {p + "mlp.gate.weight": (c["n_routed_experts"], h), p + "mlp.gate.e_score_correction_bias": (c["n_routed_experts"],)}
        for expert in [f"experts.{e}" for e in range(c["n_routed_experts"])] + ["shared_experts"]:
            q = f"{p}mlp.{expert}."
            tensors |= {q + "gate_proj.weight": (inter, h), q + "up_proj.weight": (inter, h), q + "down_proj.weight": (h, inter)}
    generator = torch.Generator().manual_seed(0)
    out = {}
    for name, shape in tensors.items():
        dtype = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
        out[name] = (torch.randn(shape, generator=generator) * 0.05).to(dtype)
    return out


def write_checkpoint(directory: Path, config: dict = SMALL, num_shards: int = 2) -> dict[str, torch.Tensor]:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = checkpoint_tensors(config)
    names = sorted(tensors)
    if num_shards == 1:
        save_file(tensors, str(directory / "model.safetensors"))
    else:
        weight_map = {}
        for i in range(num_shards):
            shard = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
            part = {n: tensors[n] for n in names[i::num_shards]}
            save_file(part, str(directory / shard))
            weight_map |= {n: shard for n in part}
        (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "tokenizer_config.json").write_text('{"model_max_length": 4096}')
    return tensors


@pytest.fixture
def float_checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    directory = tmp_path / "float"
    return directory, write_checkpoint(directory)
