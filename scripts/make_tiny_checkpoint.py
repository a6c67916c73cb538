"""Write a tiny GLM-4.7-Flash checkpoint in the real layout, with random weights.

The layout is the real one: config.json in the checkpoint's own form, sharded safetensors
with an index, per-expert tensor names, an MTP block after the main layers, and a small
byte-level BPE tokenizer.json that carries the GLM special tokens. Every weight is random
(norms and the router's correction bias too) so no code path hides behind ones and zeros.

    python scripts/make_tiny_checkpoint.py OUT_DIR [--seed 0] [--set hidden_size=128 ...]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

# The 36 added tokens of the GLM-4.7 tokenizer, in id order (they follow the BPE ids).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
    "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
    "<|begin_of_video|>", "<|end_of_video|>", "<|begin_of_audio|>", "<|end_of_audio|>",
    "<|begin_of_transcription|>", "<|end_of_transcription|>", "<|code_prefix|>", "<|code_middle|>",
    "<|code_suffix|>", "<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>",
    "</tool_response>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "/nothink",
    "<|begin_of_box|>", "<|end_of_box|>", "<|image|>", "<|video|>",
]  # fmt: skip
STOP_TOKENS = ["<|endoftext|>", "<|user|>", "<|observation|>"]

# Pre-tokenization of the GLM tokenizer: one regex split, then byte-level without its own regex.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TRAINING_TEXT = """\
def fibonacci(n: int) -> int:
    if n < 2:
        return n
    return fibonacci(n - 1) + fibonacci(n - 2)

class Stack:
    def __init__(self):
        self.items = []
    def push(self, item):
        self.items.append(item)
    def pop(self):
        return self.items.pop()

import os, sys, json
for i in range(10):
    print(f"value {i}: {i * i}")
The quick brown fox jumps over the lazy dog. A coding assistant reads files, edits code and
runs the tests until they pass. Let me look at the failing test first, then fix the bug.
héllo wörld, naïve café, 日本語のテキスト, 中文文本, emoji 🙂🚀 and symbols → ≤ ≥ ∑.
git status; git diff; pytest -q tests/test_app.py::test_parse
{"name": "read_file", "arguments": {"path": "src/app.py"}}
"""

DEFAULTS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 24,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.8,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 4096,
    "num_nextn_predict_layers": 1,
}


def make_tokenizer(vocab_size: int = 384) -> Tokenizer:
    """A small byte-level BPE in the GLM style; special tokens come after the BPE ids."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tokenizer.train_from_iterator(TRAINING_TEXT.splitlines(keepends=True) * 4, trainer)
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    return tokenizer


def make_tiny_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    num_shards: int = 3,
    dtype: torch.dtype = torch.float32,
    config_form: str = "real",
    with_weights: bool = True,
    **overrides: Any,
) -> Path:
    """Write the checkpoint into out_dir and return it. `overrides` change config fields.

    with_weights=False writes only config and tokenizer (for shapes too big to write to disk).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = make_tokenizer()
    tokenizer.save(str(out / "tokenizer.json"))
    config = _config(tokenizer, dtype, config_form, {**DEFAULTS, **overrides})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|endoftext|>",
                    "pad_token": "<|endoftext|>", "add_bos_token": False}, indent=2) + "\n"
    )  # fmt: skip
    if with_weights:
        generator = torch.Generator().manual_seed(seed)
        _write_shards(out, _random_tensors(config, generator, dtype), num_shards)
    return out


def _config(tokenizer: Tokenizer, dtype: torch.dtype, form: str, fields: dict[str, Any]) -> dict[str, Any]:
    real_tokens = tokenizer.get_vocab_size(with_added_tokens=True)
    vocab_size = fields.pop("vocab_size", None) or 64 * math.ceil((real_tokens + 8) / 64)  # padded rows
    stop_ids = [tokenizer.token_to_id(t) for t in STOP_TOKENS]
    config = {
        "architectures": ["Glm4MoeLiteForCausalLM"],
        "model_type": "glm4_moe_lite",
        "attention_bias": False,
        "hidden_act": "silu",
        "vocab_size": vocab_size,
        "pad_token_id": stop_ids[0],
        "eos_token_id": stop_ids,
        "tie_word_embeddings": False,
        "dtype": str(dtype).removeprefix("torch."),
        **fields,
    }
    if form == "real":
        config["rope_scaling"] = None
        config["partial_rotary_factor"] = 1.0
    elif form == "transformers":  # the form transformers 5 writes
        first_moe = config.pop("first_k_dense_replace")
        layers = config["num_hidden_layers"]
        config["mlp_layer_types"] = ["dense" if i < first_moe else "sparse" for i in range(layers)]
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    else:
        raise ValueError(f"unknown config form {form!r}")
    return config


def _random_tensors(config: dict[str, Any], gen: torch.Generator, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    hidden, vocab = config["hidden_size"], config["vocab_size"]
    tensors: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": _randn(gen, vocab, hidden, std=1.0),
        "model.norm.weight": _norm(gen, hidden),
        "lm_head.weight": _matrix(gen, vocab, hidden),
    }
    num_layers = config["num_hidden_layers"]
    first_moe = config.get("first_k_dense_replace", 1)
    if "mlp_layer_types" in config:
        first_moe = config["mlp_layer_types"].count("dense")
    for layer in range(num_layers + config.get("num_nextn_predict_layers", 0)):
        dense = layer < first_moe
        tensors |= _layer_tensors(config, gen, f"model.layers.{layer}.", dense)
        if layer >= num_layers:  # the MTP block
            prefix = f"model.layers.{layer}."
            tensors |= {
                prefix + "eh_proj.weight": _matrix(gen, hidden, 2 * hidden),
                prefix + "enorm.weight": _norm(gen, hidden),
                prefix + "hnorm.weight": _norm(gen, hidden),
                prefix + "shared_head.norm.weight": _norm(gen, hidden),
                prefix + "shared_head.head.weight": _matrix(gen, vocab, hidden),
                prefix + "embed_tokens.weight": _randn(gen, vocab, hidden, std=1.0),
            }
    routers_fp32 = {n: t for n, t in tensors.items() if n.endswith("e_score_correction_bias")}
    return {n: t if n in routers_fp32 else t.to(dtype) for n, t in tensors.items()}


def _layer_tensors(config: dict[str, Any], gen: torch.Generator, prefix: str, dense: bool) -> dict[str, torch.Tensor]:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    nope, rope, v_dim = config["qk_nope_head_dim"], config["qk_rope_head_dim"], config["v_head_dim"]
    q_rank, kv_rank = config.get("q_lora_rank"), config["kv_lora_rank"]
    attn = prefix + "self_attn."
    t = {
        prefix + "input_layernorm.weight": _norm(gen, hidden),
        prefix + "post_attention_layernorm.weight": _norm(gen, hidden),
        attn + "kv_a_proj_with_mqa.weight": _matrix(gen, kv_rank + rope, hidden),
        attn + "kv_a_layernorm.weight": _norm(gen, kv_rank),
        attn + "kv_b_proj.weight": _matrix(gen, heads * (nope + v_dim), kv_rank),
        attn + "o_proj.weight": _matrix(gen, hidden, heads * v_dim),
    }
    if q_rank:
        t[attn + "q_a_proj.weight"] = _matrix(gen, q_rank, hidden)
        t[attn + "q_a_layernorm.weight"] = _norm(gen, q_rank)
        t[attn + "q_b_proj.weight"] = _matrix(gen, heads * (nope + rope), q_rank)
    else:
        t[attn + "q_proj.weight"] = _matrix(gen, heads * (nope + rope), hidden)
    mlp = prefix + "mlp."
    if dense:
        return t | _mlp_tensors(gen, mlp, hidden, config["intermediate_size"])
    experts, width = config["n_routed_experts"], config["moe_intermediate_size"]
    t[mlp + "gate.weight"] = _matrix(gen, experts, hidden)
    t[mlp + "gate.e_score_correction_bias"] = _randn(gen, experts, std=0.2)
    for expert in range(experts):
        t |= _mlp_tensors(gen, f"{mlp}experts.{expert}.", hidden, width)
    return t | _mlp_tensors(gen, mlp + "shared_experts.", hidden, width * config["n_shared_experts"])


def _mlp_tensors(gen: torch.Generator, prefix: str, hidden: int, width: int) -> dict[str, torch.Tensor]:
    return {
        prefix + "gate_proj.weight": _matrix(gen, width, hidden),
        prefix + "up_proj.weight": _matrix(gen, width, hidden),
        prefix + "down_proj.weight": _matrix(gen, hidden, width),
    }


def _randn(gen: torch.Generator, *shape: int, std: float) -> torch.Tensor:
    return torch.randn(*shape, generator=gen) * std


def _matrix(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    return _randn(gen, rows, cols, std=cols**-0.5)


def _norm(gen: torch.Generator, dim: int) -> torch.Tensor:
    return 1.0 + _randn(gen, dim, std=0.2)


def _write_shards(out: Path, tensors: dict[str, torch.Tensor], num_shards: int) -> None:
    names = list(tensors)
    per_shard = math.ceil(len(names) / num_shards)
    weight_map: dict[str, str] = {}
    for index in range(num_shards):
        chunk = names[index * per_shard : (index + 1) * per_shard]
        file_name = f"model-{index + 1:05d}-of-{num_shards:05d}.safetensors"
        save_file({n: tensors[n].contiguous() for n in chunk}, str(out / file_name), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(chunk, file_name)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a config field (JSON value), e.g. --set num_hidden_layers=4")  # fmt: skip
    args = parser.parse_args()
    overrides = {k: json.loads(v) for k, v in (item.split("=", 1) for item in args.set)}
    out = make_tiny_checkpoint(
        args.out_dir, seed=args.seed, num_shards=args.shards, dtype=getattr(torch, args.dtype), **overrides
    )
    print(out)


if __name__ == "__main__":
    main()
