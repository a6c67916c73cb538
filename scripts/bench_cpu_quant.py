"""CPU speed of the quantized engine at GLM-4.7-Flash's real shapes, with random weights.

The weights are generated directly in quantized form (no 60 GB checkpoint) and handed to
`LLM.from_model` with a tokenizer written beside the config. Prefill is timed through LLM.generate; decode at context C through
the engine's decode path on a cache whose first C slots hold random latents (as
bench_engine.py does; speed does not depend on the values). Prints a table and JSON; the
llama.cpp figures measured on the same 2-core machine are the baseline.

    PYTHONPATH=. python scripts/bench_cpu_quant.py --quantization int4 [--layers 4] [--contexts 512,4096]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmcode.engine import LLM, SamplingParams  # noqa: E402
from glmcode.engine.config import ModelConfig  # noqa: E402
from glmcode.engine.model import GlmMoeLite  # noqa: E402
from glmcode.engine.quant.formats import Int4Weight, Int8Weight, QuantizedWeight, QuantScheme, int4_group_size  # noqa: E402
from glmcode.engine.quant.loader import QuantizedModelBuilder  # noqa: E402
from glmcode.engine.tokenizer import Tokenizer  # noqa: E402

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


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    return module


def build_llm(config: dict, quantization: str, directory: Path, max_context: int) -> LLM:
    """An LLM over random quantized weights; the directory holds only config and tokenizer."""
    writer = _script("make_tiny_checkpoint")
    writer.make_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))
    (directory / "config.json").write_text(json.dumps(config))
    model = random_quantized_model(ModelConfig.from_dict(config), QuantScheme.named(quantization))
    kv_bytes = config["num_hidden_layers"] * (max_context + 512) * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2
    llm = LLM.from_model(model, Tokenizer(directory), kv_cache_memory=kv_bytes, enable_prefix_caching=False)
    llm.kv_cache.data.normal_()
    return llm


def random_quantized_model(config: ModelConfig, scheme: QuantScheme, *, seed: int = 0) -> GlmMoeLite:
    """A model of `config`'s shapes with random weights made directly in quantized form: no
    float weights and no checkpoint on disk are ever needed."""
    generator = torch.Generator().manual_seed(seed)
    builder = QuantizedModelBuilder(config, torch.bfloat16, torch.device("cpu"))
    for name, slot in builder.slots.items():
        if slot.covers:  # the fused form of experts that come one by one
            continue
        bits = scheme.bits_for(name, slot.shape)
        builder.place(name, random_tensor(slot.shape, generator) if bits is None else random_quantized(slot.shape, bits, scheme, generator))
    return builder.finish()


def random_tensor(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return 1.0 + 0.1 * torch.randn(shape, generator=generator)
    return torch.randn(shape, generator=generator) * shape[-1] ** -0.5


def random_quantized(shape: tuple[int, ...], bits: int, scheme: QuantScheme, generator: torch.Generator) -> QuantizedWeight:
    rows, cols = shape
    step = cols**-0.5 / 4  # a weight std of about 1 / sqrt(cols): activations stay in range
    if bits == 8:
        values = torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=generator)
        return Int8Weight(values, torch.full((rows,), step / 16))
    group = int4_group_size(cols, scheme.group_size)
    nibbles = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=generator)
    scales = torch.full((rows, cols // group), step, dtype=torch.bfloat16)
    return Int4Weight(nibbles, scales, torch.zeros_like(scales), group)


def time_prefill(llm: LLM, tokens: int, repeats: int = 2) -> float:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.num_real_tokens, (tokens,), generator=gen).tolist()
    llm.generate(prompt[:16], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    seconds = []
    for _ in range(repeats):
        seconds.append(llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0)).stats.prefill_seconds)
    return tokens / min(seconds)


def time_decode(llm: LLM, context: int, steps: int) -> float:
    """Median tokens/s of single decode steps at `context` cached tokens."""
    decoder = _script("bench_engine").GlmcodeDecoder(llm, context, torch.Generator().manual_seed(1))
    decoder.step()  # warm-up
    times = []
    for _ in range(steps):
        started = time.perf_counter()
        decoder.step()
        times.append(time.perf_counter() - started)
    decoder.close()
    return 1.0 / statistics.median(times)


def compare_kernels(repeats: int = 30) -> dict:
    """Median microseconds per call, aten packed-weight ops vs ours, at the model's shapes."""
    from glmcode.engine.quant import experts as quant_experts
    from glmcode.engine.quant import linear

    gen = torch.Generator().manual_seed(0)

    def int4(rows: int, cols: int) -> Int4Weight:
        nibbles = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
        scales = torch.full((rows, cols // 128), 1e-3, dtype=torch.bfloat16)
        return Int4Weight(nibbles, scales, torch.zeros_like(scales), 128)

    def int8(rows: int, cols: int) -> Int8Weight:
        return Int8Weight(torch.randint(-127, 128, (rows, cols), dtype=torch.int8, generator=gen), torch.full((rows,), 1e-3))

    def median_us(fn, calls: int) -> float:
        fn(0)
        times = []
        for i in range(calls):
            started = time.perf_counter()
            fn(i)
            times.append(time.perf_counter() - started)
        return round(statistics.median(times) * 1e6, 1)

    experts = 16  # cycled, so the weights come from memory, not cache
    gate_up, down = [int4(3072, 2048) for _ in range(experts)], [int4(2048, 1536) for _ in range(experts)]
    x = torch.randn(1, 2048, dtype=torch.bfloat16)
    ids = [torch.randperm(experts, generator=gen)[:4] for _ in range(repeats)]
    route = torch.rand(4)
    lm_head = int8(154880, 2048)
    o_proj4, o_proj8 = int4(2048, 5120), int8(2048, 5120)
    xo = torch.randn(1, 5120, dtype=torch.bfloat16)
    result = {}
    for kernel in ("aten", "vnni"):
        if kernel == "vnni" and linear.select_kernel(4, torch.device("cpu")) != "vnni":
            break
        original = linear.select_kernel
        linear.select_kernel = lambda bits, device, kernel=kernel: kernel
        try:
            moe = quant_experts.quantized_experts(gate_up, down, dtype=torch.bfloat16)
            head, o4, o8 = (linear.quantized_linear(w, dtype=torch.bfloat16) for w in (lm_head, o_proj4, o_proj8))
        finally:
            linear.select_kernel = original
        result[kernel] = {
            "moe_4_experts_1_token": median_us(lambda i: moe(x, ids[i % repeats][None], route[None]), repeats),
            "lm_head_int8": median_us(lambda i: head(x), max(5, repeats // 5)),
            "o_proj_int8": median_us(lambda i: o8(xo), repeats),
            "o_proj_int4": median_us(lambda i: o4(xo), repeats),
        }
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quantization", default="int4", choices=["int4", "int4-all", "int8"])
    parser.add_argument("--layers", type=int, default=FULL_CONFIG["num_hidden_layers"], help="fewer layers for a quick run")
    parser.add_argument("--contexts", default="512,4096,32768", help="decode context lengths")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--compare-kernels", action="store_true", help="only time aten ops vs ours per call")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.compare_kernels:
        result = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "median_us": compare_kernels()}
        print(json.dumps(result))
        return result
    contexts = [int(c) for c in args.contexts.split(",") if c]

    config = FULL_CONFIG | {"num_hidden_layers": args.layers}
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-quant-") as tmp:
        started = time.perf_counter()
        llm = build_llm(config, args.quantization, Path(tmp), max(contexts + [args.prefill_tokens]) + args.decode_steps + 4)
        result: dict = {
            "quantization": args.quantization,
            "layers": args.layers,
            "threads": torch.get_num_threads(),
            "load_average": os.getloadavg(),
            "build_s": round(time.perf_counter() - started, 1),
            "rss_after_build_gb": round(peak_rss_gb(), 2),
        }
        if args.prefill_tokens:
            result[f"prefill_{args.prefill_tokens}"] = round(time_prefill(llm, args.prefill_tokens), 2)
        for context in contexts:
            result[f"decode_{context}"] = round(time_decode(llm, context, args.decode_steps), 2)
    result["peak_rss_gb"] = round(peak_rss_gb(), 2)
    _print_table(result, scale=args.layers / FULL_CONFIG["num_hidden_layers"])
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


def _print_table(result: dict, scale: float) -> None:
    print(f"{'metric':<16}{'ours':>10}{'llama.cpp':>12}{'ratio':>8}", file=sys.stderr)
    for key, value in result.items():
        if not key.startswith(("decode_", "prefill_")):
            continue
        base = LLAMA_CPP.get(key)
        ratio = f"{value / base:.2f}" if base and scale == 1 else "-"
        print(f"{key + ' tok/s':<16}{value:>10}{base or '-':>12}{ratio:>8}", file=sys.stderr)
    # Ours builds random weights in quantized form; llama.cpp's figure is a load from page cache.
    for key, base_key, label in (("peak_rss_gb", "rss_gb", "peak RSS GB"), ("build_s", "load_s", "build/load s")):
        print(f"{label:<16}{result[key]:>10}{LLAMA_CPP[base_key]:>12}{'-':>8}", file=sys.stderr)
    if scale != 1:
        print(f"({scale:.0%} of the layers: not comparable to llama.cpp's full-model figures)", file=sys.stderr)


if __name__ == "__main__":
    main()
