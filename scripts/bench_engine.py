"""Benchmark the glmcode engine against HF transformers on the same random weights.

Both engines load one checkpoint of random weights (speed does not depend on the values) in
this process, one after the other. For each engine it measures prefill tokens/s on a random
prompt, decode tokens/s at several context lengths, and peak memory. It prints a table and
writes JSON.

Decode at context C is measured on a cache that already holds C tokens of random latents,
written straight into each engine's own cache (prefilling 16K tokens on a CPU takes minutes
and does not change the decode cost). Each engine then decodes real steps through its normal
decode path: ours through the absorbed attention over the paged latent cache, transformers'
through `forward` with its DynamicCache, which re-expands every cached latent at each step.

    python scripts/bench_engine.py --config small --device cpu
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmcode.engine import LLM, SamplingParams  # noqa: E402

SMALL = {  # the real per-layer shapes with fewer layers, experts and vocabulary
    "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
    "num_hidden_layers": 4, "num_attention_heads": 20, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 16,
    "num_experts_per_tok": 4, "vocab_size": 32768, "rope_theta": 1e6, "max_position_embeddings": 202752,
    "num_nextn_predict_layers": 0,
}  # fmt: skip
FULL = SMALL | {"num_hidden_layers": 47, "n_routed_experts": 64, "vocab_size": 154880}
CONFIGS = {"tiny": {"max_position_embeddings": 202752, "num_nextn_predict_layers": 0}, "small": SMALL, "full": FULL}


@dataclass
class EngineResult:
    name: str
    prefill_tokens_per_s: float = 0.0
    decode_ms: dict[int, float] = field(default_factory=dict)  # context -> median ms per token
    peak_memory_mb: float = 0.0
    weights_mb: float = 0.0

    def decode_tokens_per_s(self) -> dict[int, float]:
        return {c: 1000.0 / ms for c, ms in self.decode_ms.items()}


# ----- memory -----


def reset_peak_memory(device: str) -> None:
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def timed(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# ----- glmcode -----


def bench_glmcode(path: Path, args, contexts: list[int]) -> EngineResult:
    result = EngineResult("glmcode")
    reset_peak_memory(args.device)
    need = max(contexts + [args.prefill_tokens]) + args.decode_steps + 1
    llm = LLM(path, device=args.device, dtype=args.dtype, kv_cache_memory=kv_bytes(path, need, args.dtype),
              enable_prefix_caching=False, progress=False)  # fmt: skip
    result.weights_mb = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**20
    vocab = llm.num_real_tokens
    gen = torch.Generator().manual_seed(0)

    prompt = torch.randint(0, vocab, (args.prefill_tokens,), generator=gen).tolist()
    llm.generate(prompt[:32], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    times = []
    for _ in range(args.prefill_repeats):
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
        times.append(llm.stats.prefill_seconds)
    result.prefill_tokens_per_s = args.prefill_tokens / min(times)

    llm.kv_cache.data.normal_()
    for context in contexts:
        tokens = torch.randint(0, vocab, (context,), generator=gen).tolist()
        request = llm._new_request(tokens, SamplingParams(temperature=0))
        assert llm.blocks.allocate(request.seq, use_prefix_cache=False)
        request.seq.num_computed = context  # its cache slots already hold (random) latents
        steps = []
        with torch.inference_mode():
            for _ in range(args.decode_steps + 1):
                llm.blocks.grow(request.seq, len(request.seq))
                steps.append(timed(lambda: request.sampler(llm._decode_logits([request])[0]), args.device))
                request.seq.token_ids.append(int(torch.randint(0, vocab, (1,), generator=gen)))
        llm.blocks.free_sequence(request.seq)
        result.decode_ms[context] = 1000 * statistics.median(steps[1:])
        print(f"  glmcode  ctx {context:>6}: {result.decode_ms[context]:8.1f} ms/token", flush=True)
    result.peak_memory_mb = peak_memory_mb(args.device)
    del llm
    gc.collect()
    return result


def kv_bytes(path: Path, tokens: int, dtype: str) -> int:
    config = json.loads((path / "config.json").read_text())
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * element
    return (tokens + 512) * per_token


# ----- transformers -----


def bench_transformers(path: Path, args, contexts: list[int]) -> EngineResult:
    from transformers import DynamicCache, Glm4MoeLiteForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    result = EngineResult("transformers")
    reset_peak_memory(args.device)
    model = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    result.weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    config = model.config
    gen = torch.Generator().manual_seed(0)
    vocab = config.vocab_size

    def forward(ids, cache, start):
        positions = torch.arange(start, start + ids.shape[1], device=args.device)[None]
        return model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True).logits

    with torch.inference_mode():
        prompt = torch.randint(0, vocab, (1, args.prefill_tokens), generator=gen).to(args.device)
        forward(prompt[:, :32], DynamicCache(config=config), 0)  # warm-up
        times = [timed(lambda: forward(prompt, DynamicCache(config=config), 0), args.device)
                 for _ in range(args.prefill_repeats)]  # fmt: skip
        result.prefill_tokens_per_s = args.prefill_tokens / min(times)

        for context in contexts:
            cache = DynamicCache(config=config)
            dtype = getattr(torch, args.dtype)
            for layer in range(config.num_hidden_layers):
                latent = torch.randn(1, 1, context, config.kv_lora_rank, dtype=dtype, device=args.device)
                k_rot = torch.randn(1, 1, context, config.qk_rope_head_dim, dtype=dtype, device=args.device)
                cache.update(latent, k_rot, layer)
            steps = []
            for step in range(args.hf_decode_steps + 1):
                token = torch.randint(0, vocab, (1, 1), generator=gen).to(args.device)
                steps.append(timed(lambda: forward(token, cache, context + step).argmax(-1), args.device))
            result.decode_ms[context] = 1000 * statistics.median(steps[1:])
            print(f"  hf       ctx {context:>6}: {result.decode_ms[context]:8.1f} ms/token", flush=True)
            del cache
    result.peak_memory_mb = peak_memory_mb(args.device)
    del model
    gc.collect()
    return result


# ----- main -----


def write_checkpoint(config_name: str, out: Path, dtype: str) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    return writer.make_tiny_checkpoint(out, num_shards=2, dtype=getattr(torch, dtype), **CONFIGS[config_name])


def print_table(results: list[EngineResult], contexts: list[int]) -> None:
    ours, hf = results[0], (results[1] if len(results) > 1 else None)
    print()
    print(f"{'metric':<28}{'glmcode':>14}{'transformers':>14}{'ratio':>9}")
    rows = [("prefill tok/s", ours.prefill_tokens_per_s, hf and hf.prefill_tokens_per_s)]
    for c in contexts:
        rows.append((f"decode tok/s @ {c}", ours.decode_tokens_per_s()[c], hf and hf.decode_tokens_per_s()[c]))
    for c in contexts:
        rows.append((f"decode ms/token @ {c}", ours.decode_ms[c], hf and hf.decode_ms[c]))
    rows.append(("peak memory MiB", ours.peak_memory_mb, hf and hf.peak_memory_mb))
    rows.append(("weights MiB", ours.weights_mb, hf and hf.weights_mb))
    for name, a, b in rows:
        ratio = ""
        if b:
            ratio = f"{(b / a if 'ms/token' in name or 'MiB' in name else a / b):8.2f}x"
        print(f"{name:<28}{a:>14.2f}{(f'{b:.2f}' if b else '-'):>14}{ratio:>9}")
    slowdown = ours.decode_ms[contexts[-1]] / ours.decode_ms[contexts[0]]
    print(f"\nglmcode ms/token at {contexts[-1]} vs {contexts[0]}: {slowdown:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description="glmcode engine vs HF transformers")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--contexts", default="512,4096,16384", help="decode context lengths")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--decode-steps", type=int, default=12, help="timed glmcode decode steps per context")
    parser.add_argument("--hf-decode-steps", type=int, default=3, help="timed transformers decode steps")
    parser.add_argument("--skip-hf", action="store_true", help="glmcode only (e.g. --config full)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="default: bench-results/engine-CONFIG-DEVICE.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in args.contexts.split(",")]

    results = []
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-") as tmp:
        started = time.perf_counter()
        path = write_checkpoint(args.config, Path(tmp), args.dtype)
        print(f"random {args.config} checkpoint written in {time.perf_counter() - started:.0f}s", flush=True)
        results.append(bench_glmcode(path, args, contexts))
        if not args.skip_hf:
            results.append(bench_transformers(path, args, contexts))

    print_table(results, contexts)
    report = {
        "config": args.config,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "decode_context_fill": "random latents written into each engine's own cache",
        "results": [
            {**r.__dict__, "decode_tokens_per_s": r.decode_tokens_per_s()} for r in results
        ],
    }
    if len(results) == 2:
        ours, hf = results
        report["speedup_decode"] = {c: hf.decode_ms[c] / ours.decode_ms[c] for c in contexts}
        report["speedup_prefill"] = ours.prefill_tokens_per_s / hf.prefill_tokens_per_s
    out = args.json or ROOT / "bench-results" / f"engine-{args.config}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
