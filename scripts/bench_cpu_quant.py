"""CPU speed of the quantized engine at GLM-4.7-Flash's real shapes, with random weights.

The weights are generated directly in quantized form (no 60 GB checkpoint), the KV cache is
filled with random latents to the requested context (speed does not depend on values), and the
model's own prefill and absorbed-decode paths are timed. Prints a table and a JSON line; the
llama.cpp figures measured on the same 2-core machine are the baseline.

    PYTHONPATH=. python scripts/bench_cpu_quant.py --quantization int4 [--layers 4] [--contexts 512,4096]
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import torch

from glmcode.engine.attention import AttentionBatch, KVSpan
from glmcode.engine.config import ModelConfig
from glmcode.engine.quant import QuantScheme
from glmcode.engine.quant_model import random_quantized_model

FULL_CONFIG = {
    "model_type": "glm4_moe_lite",
    "vocab_size": 154880,
    "hidden_size": 2048,
    "intermediate_size": 10240,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 47,
    "num_attention_heads": 20,
    "num_key_value_heads": 20,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 192,
    "qk_rope_head_dim": 64,
    "v_head_dim": 256,
    "n_routed_experts": 64,
    "n_shared_experts": 1,
    "num_experts_per_tok": 4,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.8,
    "norm_topk_prob": True,
    "n_group": 1,
    "topk_group": 1,
    "rms_norm_eps": 1e-5,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "max_position_embeddings": 202752,
    "tie_word_embeddings": False,
    "num_nextn_predict_layers": 1,
    "eos_token_id": [154820, 154827, 154829],
    "dtype": "bfloat16",
}

# llama.cpp (llama-cpp-python 0.3.36, Q4_0 + repacking, flash attention, 2 threads), same VM.
LLAMA_CPP = {"decode_512": 9.05, "decode_4096": 3.76, "prefill_512": 22.1, "load_s": 21.7, "rss_gb": 17.0}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def time_prefill(model, config: ModelConfig, tokens: int, chunk: int) -> float:
    cache = torch.zeros(config.num_hidden_layers, tokens, config.kv_cache_dim, dtype=torch.bfloat16)
    ids = torch.randint(0, config.vocab_size, (tokens,))
    started = time.perf_counter()
    for start in range(0, tokens, chunk):
        end = min(tokens, start + chunk)
        batch = AttentionBatch(
            positions=torch.arange(start, end),
            write_slots=torch.arange(start, end),
            contexts=[[KVSpan(0, end)]],
            prefill_start=start,
        )
        hidden = model(ids[start:end], batch, cache)
    model.logits(hidden[-1:])
    return tokens / (time.perf_counter() - started)


def time_decode(model, config: ModelConfig, context: int, steps: int) -> float:
    cache = (torch.randn(config.num_hidden_layers, context + steps + 1, config.kv_cache_dim) * 0.5).to(torch.bfloat16)

    def step(position: int) -> None:
        batch = AttentionBatch(
            positions=torch.tensor([position]),
            write_slots=torch.tensor([position]),
            contexts=[[KVSpan(0, position + 1)]],
        )
        hidden = model(torch.randint(0, config.vocab_size, (1,)), batch, cache)
        model.logits(hidden)

    step(context)  # warm-up
    started = time.perf_counter()
    for i in range(1, steps + 1):
        step(context + i)
    return steps / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int8"])
    parser.add_argument("--layers", type=int, default=FULL_CONFIG["num_hidden_layers"], help="fewer layers for a quick run")
    parser.add_argument("--contexts", default="512,4096,32768", help="decode context lengths")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-chunk", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    config = ModelConfig.from_dict(FULL_CONFIG | {"num_hidden_layers": args.layers})
    started = time.perf_counter()
    with torch.inference_mode():
        model = random_quantized_model(config, QuantScheme.named(args.quantization))
    result: dict = {
        "quantization": args.quantization,
        "layers": args.layers,
        "threads": args.threads,
        "build_s": round(time.perf_counter() - started, 1),
        "rss_after_build_gb": round(peak_rss_gb(), 2),
    }
    with torch.inference_mode():
        if args.prefill_tokens:
            result[f"prefill_{args.prefill_tokens}"] = round(time_prefill(model, config, args.prefill_tokens, args.prefill_chunk), 2)
        for context in [int(c) for c in args.contexts.split(",") if c]:
            result[f"decode_{context}"] = round(time_decode(model, config, context, args.decode_steps), 2)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    _print_table(result, scale=args.layers / FULL_CONFIG["num_hidden_layers"])
    print(json.dumps(result))
    return result


def _print_table(result: dict, scale: float) -> None:
    print(f"{'metric':<16}{'ours':>10}{'llama.cpp':>12}{'ratio':>8}", file=sys.stderr)
    for key, value in result.items():
        if not key.startswith(("decode_", "prefill_")):
            continue
        base = LLAMA_CPP.get(key)
        ratio = f"{value / base:.2f}" if base and scale == 1 else "-"
        print(f"{key + ' tok/s':<16}{value:>10}{base or '-':>12}{ratio:>8}", file=sys.stderr)
    if scale != 1:
        print(f"({scale:.0%} of the layers: not comparable to llama.cpp's full-model figures)", file=sys.stderr)


if __name__ == "__main__":
    main()
