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


def reset_peak_memory(device: str) -> float:
    """Starts a new peak-memory window; returns the memory in use now (MiB)."""
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
        f.write("5")
    return _proc_status_mb("VmRSS:")


def peak_memory_mb(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return _proc_status_mb("VmHWM:")


def _proc_status_mb(field_name: str) -> float:
    for line in open("/proc/self/status"):
        if line.startswith(field_name):
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


class GlmcodeDecoder:
    """Decode steps of one sequence whose first `context` cache slots hold random latents."""

    def __init__(self, llm: LLM, context: int, gen: torch.Generator):
        self.llm, self.gen = llm, gen
        tokens = torch.randint(0, llm.num_real_tokens, (context,), generator=gen).tolist()
        self.request = llm._new_request(tokens, SamplingParams(temperature=0))
        assert llm.blocks.allocate(self.request.seq, use_prefix_cache=False)
        self.request.seq.num_computed = context  # its cache slots already hold (random) latents

    @torch.inference_mode()
    def step(self) -> None:
        seq = self.request.seq
        self.llm.blocks.grow(seq, len(seq))
        self.request.sampler(self.llm._decode_logits([self.request])[0])
        seq.token_ids.append(int(torch.randint(0, self.llm.num_real_tokens, (1,), generator=self.gen)))

    def close(self) -> None:
        self.llm.blocks.free_sequence(self.request.seq)


def load_glmcode(path: Path, args, max_context: int) -> tuple[LLM, EngineResult]:
    result = EngineResult("glmcode")
    start_mb = reset_peak_memory(args.device)
    llm = LLM(path, device=args.device, dtype=args.dtype, kv_cache_memory=kv_bytes(path, max_context, args.dtype),
              enable_prefix_caching=False, progress=False)  # fmt: skip
    llm.kv_cache.data.normal_()
    result.weights_mb = sum(p.numel() * p.element_size() for p in llm.model.parameters()) / 2**20
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, llm.num_real_tokens, (args.prefill_tokens,), generator=gen).tolist()
    llm.generate(prompt[:32], SamplingParams(max_tokens=2, temperature=0))  # warm-up
    times = []
    for _ in range(args.prefill_repeats):
        llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
        times.append(llm.stats.prefill_seconds)
    result.prefill_tokens_per_s = args.prefill_tokens / min(times)
    decoder = GlmcodeDecoder(llm, max_context - args.decode_steps - 2, gen)
    decoder.step()
    decoder.close()
    result.peak_memory_mb = peak_memory_mb(args.device) - start_mb
    return llm, result


def kv_bytes(path: Path, tokens: int, dtype: str) -> int:
    config = json.loads((path / "config.json").read_text())
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * element
    return (tokens + 512) * per_token


# ----- transformers -----


class TransformersDecoder:
    """Decode steps through forward() with a DynamicCache prefilled with `context` random latents."""

    def __init__(self, model, context: int, gen: torch.Generator, device: str):
        from transformers import DynamicCache

        self.model, self.gen, self.device, self.position = model, gen, device, context
        config = model.config
        self.cache = DynamicCache(config=config)
        dtype = model.dtype
        for layer in range(config.num_hidden_layers):
            latent = torch.randn(1, 1, context, config.kv_lora_rank, dtype=dtype, device=device)
            k_rot = torch.randn(1, 1, context, config.qk_rope_head_dim, dtype=dtype, device=device)
            self.cache.update(latent, k_rot, layer)

    @torch.inference_mode()
    def step(self) -> None:
        token = torch.randint(0, self.model.config.vocab_size, (1, 1), generator=self.gen).to(self.device)
        positions = torch.tensor([[self.position]], device=self.device)
        self.model(input_ids=token, position_ids=positions, cache=self.cache, use_cache=True).logits.argmax(-1)
        self.position += 1

    def close(self) -> None:
        del self.cache


def load_transformers(path: Path, args, max_context: int):
    from transformers import DynamicCache, Glm4MoeLiteForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    result = EngineResult("transformers")
    start_mb = reset_peak_memory(args.device)
    model = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype)).to(args.device).eval()
    result.weights_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, model.config.vocab_size, (1, args.prefill_tokens), generator=gen).to(args.device)

    @torch.inference_mode()
    def prefill(ids):
        model(input_ids=ids, cache=DynamicCache(config=model.config), use_cache=True)

    prefill(prompt[:, :32])  # warm-up
    times = [timed(lambda: prefill(prompt), args.device) for _ in range(args.prefill_repeats)]
    result.prefill_tokens_per_s = args.prefill_tokens / min(times)
    decoder = TransformersDecoder(model, max_context - args.hf_decode_steps - 2, gen, args.device)
    decoder.step()
    decoder.close()
    result.peak_memory_mb = peak_memory_mb(args.device) - start_mb
    return model, result


def measure_decode(engines: list[tuple[EngineResult, object, int]], contexts: list[int], args) -> None:
    """Per context, alternate single steps of the engines so that both see the same machine load.

    engines: (result, make_decoder(context), timed steps). The first step of each is a warm-up.
    """
    for context in contexts:
        decoders = [(result, make(context), steps) for result, make, steps in engines]
        times: dict[str, list[float]] = {result.name: [] for result, _, _ in decoders}
        for index in range(max(steps for _, _, steps in decoders) + 1):
            for result, decoder, steps in decoders:
                if index <= steps:
                    times[result.name].append(timed(decoder.step, args.device))
        for result, decoder, _ in decoders:
            decoder.close()
            result.decode_ms[context] = 1000 * statistics.median(times[result.name][1:])
            print(f"  {result.name:<13} ctx {context:>6}: {result.decode_ms[context]:8.1f} ms/token", flush=True)
        gc.collect()


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

    max_context = max(contexts) + max(args.decode_steps, args.hf_decode_steps) + 4
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-") as tmp:
        started = time.perf_counter()
        path = write_checkpoint(args.config, Path(tmp), args.dtype)
        print(f"random {args.config} checkpoint written in {time.perf_counter() - started:.0f}s", flush=True)
        gen = torch.Generator().manual_seed(1)
        llm, ours = load_glmcode(path, args, max_context)
        engines = [(ours, lambda c: GlmcodeDecoder(llm, c, gen), args.decode_steps)]
        if not args.skip_hf:
            model, hf = load_transformers(path, args, max_context)
            engines.append((hf, lambda c: TransformersDecoder(model, c, gen, args.device), args.hf_decode_steps))
        results = [result for result, _, _ in engines]
        measure_decode(engines, contexts, args)

    print_table(results, contexts)
    report = {
        "config": args.config,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "decode_context_fill": "random latents written into each engine's own cache",
        "decode_timing": "median of single steps, the two engines' steps interleaved",
        "peak_memory": "peak increase over the memory in use before loading (RSS on CPU)",
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
