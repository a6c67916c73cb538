"""Benchmark the glmcode engine against HF transformers on the same random weights.

Both engines load one checkpoint of random weights (speed does not depend on the values) into
this process. The script measures prefill tokens/s on random prompts, decode tokens/s at
several context lengths, and the peak memory of loading and running each engine; it prints a
table and writes JSON. The engines take turns, run by run (prefill) and in rounds of steps (decode),
so that a busy machine slows both alike.

Decode at context C runs on a cache that already holds C tokens of random latents, written
straight into each engine's own cache (prefilling 16K tokens on a CPU takes minutes and does
not change the cost of a decode step). Each engine then decodes through its normal path: ours
through absorbed attention over the paged latent cache, transformers' through `forward` with
its DynamicCache, which re-expands every cached latent at each step.

    python scripts/bench_engine.py --config small --device cpu [--threads 1]

`--config full` (the real shapes, 60 GB in bf16) fills our engine's weights in place instead of
writing a checkpoint, and skips transformers, which would need a second copy.
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
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

import glmcode.engine.llm as llm_module  # noqa: E402
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


# ----- the two engines behind one small interface -----


class GlmcodeEngine:
    def __init__(self, path: Path, args, max_context: int):
        self.result = EngineResult("glmcode")
        self.device = args.device
        start_mb = reset_peak_memory(args.device)
        memory = kv_bytes(path, max_context, args.dtype)
        self.llm = LLM(path, device=args.device, dtype=args.dtype, kv_cache_memory=memory,
                       enable_prefix_caching=False, progress=False)  # fmt: skip
        self.llm.kv_cache.data.normal_()  # decode contexts are random latents
        self.vocab = self.llm.num_real_tokens
        self.result.weights_mb = weights_mb(self.llm.model)
        self.prefill(list(range(32)))  # warm-up
        decoder = self.decoder(max_context - args.decode_steps - 2, torch.Generator().manual_seed(0))
        decoder.step()  # the largest context, so that peak memory covers it
        decoder.close()
        self.result.peak_memory_mb = peak_memory_mb(args.device) - start_mb

    def prefill(self, prompt: list[int]) -> float:
        self.llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0))
        return self.llm.stats.prefill_seconds

    def decoder(self, context: int, gen: torch.Generator) -> GlmcodeDecoder:
        return GlmcodeDecoder(self.llm, context, gen)


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


class TransformersEngine:
    def __init__(self, path: Path, args, max_context: int):
        from transformers import Glm4MoeLiteForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.result = EngineResult("transformers")
        self.device = args.device
        start_mb = reset_peak_memory(args.device)
        self.model = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=getattr(torch, args.dtype))
        self.model = self.model.to(args.device).eval()
        self.vocab = self.model.config.vocab_size
        self.result.weights_mb = weights_mb(self.model)
        self.prefill(list(range(32)))  # warm-up
        decoder = self.decoder(max_context - args.hf_decode_steps - 2, torch.Generator().manual_seed(0))
        decoder.step()
        decoder.close()
        self.result.peak_memory_mb = peak_memory_mb(args.device) - start_mb

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> float:
        from transformers import DynamicCache

        ids = torch.tensor([prompt], device=self.device)
        cache = DynamicCache(config=self.model.config)
        return timed(lambda: self.model(input_ids=ids, cache=cache, use_cache=True).logits[:, -1].argmax(-1), self.device)

    def decoder(self, context: int, gen: torch.Generator) -> TransformersDecoder:
        return TransformersDecoder(self.model, context, gen, self.device)


class TransformersDecoder:
    """Decode steps through forward() with a DynamicCache holding `context` random latents."""

    def __init__(self, model, context: int, gen: torch.Generator, device: str):
        from transformers import DynamicCache

        self.model, self.gen, self.device, self.position = model, gen, device, context
        config = model.config
        self.cache = DynamicCache(config=config)
        for layer in range(config.num_hidden_layers):
            latent = torch.randn(1, 1, context, config.kv_lora_rank, dtype=model.dtype, device=device)
            k_rot = torch.randn(1, 1, context, config.qk_rope_head_dim, dtype=model.dtype, device=device)
            self.cache.update(latent, k_rot, layer)

    @torch.inference_mode()
    def step(self) -> None:
        token = torch.randint(0, self.model.config.vocab_size, (1, 1), generator=self.gen).to(self.device)
        positions = torch.tensor([[self.position]], device=self.device)
        self.model(input_ids=token, position_ids=positions, cache=self.cache, use_cache=True).logits.argmax(-1)
        self.position += 1

    def close(self) -> None:
        del self.cache


def weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def kv_bytes(path: Path, tokens: int, dtype: str) -> int:
    config = json.loads((path / "config.json").read_text())
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * element
    return (tokens + 512) * per_token


# ----- measurements: the engines take turns, so that both see the same machine load -----


def measure_prefill(engines: list, args) -> None:
    gen = torch.Generator().manual_seed(2)
    times: dict[str, list[float]] = {e.result.name: [] for e in engines}
    for _ in range(args.prefill_repeats):
        prompt = torch.randint(0, min(e.vocab for e in engines), (args.prefill_tokens,), generator=gen).tolist()
        for engine in engines:
            times[engine.result.name].append(engine.prefill(prompt))
    for engine in engines:
        engine.result.prefill_tokens_per_s = args.prefill_tokens / min(times[engine.result.name])
        print(f"  {engine.result.name:<13} prefill {args.prefill_tokens}: "
              f"{engine.result.prefill_tokens_per_s:8.1f} tok/s", flush=True)  # fmt: skip


def measure_decode(engines: list, contexts: list[int], args) -> None:
    """Per context, the engines take turns in rounds of a few decode steps.

    The first step of each turn is not timed: it would measure how the other engine left the
    caches and the allocator, not this engine.
    """
    gen = torch.Generator().manual_seed(1)
    steps = {"glmcode": args.decode_steps, "transformers": args.hf_decode_steps}
    for context in contexts:
        decoders = [(e.result, e.decoder(context, gen)) for e in engines]
        times: dict[str, list[float]] = {result.name: [] for result, _ in decoders}
        for _ in range(args.rounds):
            for result, decoder in decoders:
                decoder.step()
                for _ in range(math.ceil(steps[result.name] / args.rounds)):
                    times[result.name].append(timed(decoder.step, args.device))
        for result, decoder in decoders:
            decoder.close()
            result.decode_ms[context] = 1000 * statistics.median(times[result.name])
            print(f"  {result.name:<13} ctx {context:>6}: {result.decode_ms[context]:8.1f} ms/token", flush=True)
        gc.collect()


# ----- main -----


def write_checkpoint(config_name: str, out: Path, dtype: str, with_weights: bool) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    return writer.make_tiny_checkpoint(
        out, num_shards=2, dtype=getattr(torch, dtype), with_weights=with_weights, **CONFIGS[config_name]
    )


def fill_random(model, model_dir, *, progress: bool = True) -> None:
    """Stands in for the checkpoint loader when the weights were never written (--config full)."""
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.normal_(0, 0.02)


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


def run_cpu_quant(args) -> None:
    """The quantized CPU bench (owned by the quantization code), with this script's flags.

    It always uses the real per-layer shapes (64 experts, full vocabulary); --config picks only
    the number of layers: full 47, small 4, tiny 1.
    """
    spec = importlib.util.spec_from_file_location("bench_cpu_quant", ROOT / "scripts" / "bench_cpu_quant.py")
    module = sys.modules["bench_cpu_quant"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layers = args.layers or {"full": FULL["num_hidden_layers"], "small": SMALL["num_hidden_layers"], "tiny": 1}[args.config]
    contexts = args.contexts or ("512,4096,32768" if args.long_context else "512,4096")
    forwarded = ["--quantization", args.quantization, "--layers", str(layers), "--contexts", contexts,
                 "--decode-steps", str(args.decode_steps), "--prefill-tokens", str(args.prefill_tokens)]  # fmt: skip
    forwarded += ["--threads", str(args.threads)] if args.threads else []
    forwarded += ["--json", str(args.json)] if args.json else []
    module.main(forwarded)


def main() -> None:
    parser = argparse.ArgumentParser(description="glmcode engine vs HF transformers")
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--contexts", default=None,
                        help="decode context lengths (default 512,4096,16384; with --quantization 512,4096)")
    parser.add_argument("--long-context", action="store_true", help="with --quantization: also decode at 32K (slow)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --quantization: fewer decoder layers than --config has, for a quick check")
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--decode-steps", type=int, default=16, help="timed glmcode decode steps per context")
    parser.add_argument("--hf-decode-steps", type=int, default=4, help="timed transformers decode steps")
    parser.add_argument("--rounds", type=int, default=4, help="turns each engine takes per context")
    parser.add_argument("--skip-hf", action="store_true", help="glmcode only (e.g. --config full)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="default: bench-results/engine-CONFIG-DEVICE.json")
    parser.add_argument("--quantization", choices=["int4", "int4-all", "int8"], default=None,
                        help="CPU quantized weights, random in quantized form: runs scripts/bench_cpu_quant.py")
    args = parser.parse_args()
    if args.quantization:
        run_cpu_quant(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = [int(c) for c in (args.contexts or "512,4096,16384").split(",")]

    max_context = max(contexts) + max(args.decode_steps, args.hf_decode_steps) + 4
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-") as tmp:
        started = time.perf_counter()
        # The real-size model (60 GB of bf16) is never written: its weights are filled in place.
        in_place = args.config == "full"
        path = write_checkpoint(args.config, Path(tmp), args.dtype, with_weights=not in_place)
        if in_place:
            llm_module.load_checkpoint = fill_random
            args.skip_hf = True  # transformers would need its own copy of the weights
        print(f"random {args.config} checkpoint written in {time.perf_counter() - started:.0f}s", flush=True)
        engines = [GlmcodeEngine(path, args, max_context)]
        if not args.skip_hf:
            engines.append(TransformersEngine(path, args, max_context))
        measure_prefill(engines, args)
        measure_decode(engines, contexts, args)
        results = [engine.result for engine in engines]

    print_table(results, contexts)
    report = {
        "config": args.config,
        "device": args.device,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "decode_context_fill": "random latents written into each engine's own cache",
        "decode_timing": "median of timed steps; the engines take turns in rounds, first step of a turn untimed",
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
