"""Benchmark the glmcode engine against HF transformers on the same random weights.

Both engines run random weights of one config (speed does not depend on the values). The script
measures prefill tokens/s at the given prompt lengths, batch-1 decode tokens/s at several
context lengths, aggregate decode tokens/s at larger batches, the kernels (on CPU: top-level
ops) one decode step launches, and the peak memory of each engine; it prints a table and writes
JSON. On a CPU the engines take turns, run by run (prefill) and in rounds of steps (decode), so
that a busy machine slows both alike. On CUDA they run one after the other (two full-size
copies of the weights do not fit one GPU), and transformers is built on the device with random
weights and its grouped_mm experts.

Decode at context C runs on a cache that already holds C tokens of random latents, written
straight into each engine's own cache: prefilling 128K tokens would cost minutes and does not
change the cost of a decode step. Each engine then decodes through its normal path: ours through
absorbed attention over the paged latent cache (on CUDA: the kernel path, replayed from CUDA
graphs), transformers' through `forward` with its DynamicCache, which re-expands every cached
latent at each step. `--fit-context N` decodes at N tokens of context and reports whether the
engine's peak memory (weights + cache + activations + graphs) stays within 80 GB.

    python scripts/bench_engine.py --config small --device cpu [--threads 1]
    python scripts/bench_engine.py --config full --device cuda --contexts 512,8192,32768,131072 \\
        --prefill-tokens 4096,32768 --batch-sizes 8,32 --fit-context 200000

`--config full` (the real shapes, 60 GB in bf16) fills the weights in place instead of writing a
checkpoint; on a CPU it skips transformers, which would need a second copy.
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
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from glmcode.engine import LLM, SamplingParams  # noqa: E402
from glmcode.engine.config import ModelConfig, resolve_dtype  # noqa: E402
from glmcode.engine.cuda.runner import CudaRunner  # noqa: E402
from glmcode.engine.model import GlmMoeLite, build_model  # noqa: E402
from glmcode.engine.sampler import Sampler  # noqa: E402
from glmcode.engine.sequence import Sequence  # noqa: E402
from glmcode.engine.tokenizer import Tokenizer  # noqa: E402

SMALL = {  # the real per-layer shapes with fewer layers, experts and vocabulary
    "hidden_size": 2048, "intermediate_size": 10240, "moe_intermediate_size": 1536,
    "num_hidden_layers": 4, "num_attention_heads": 20, "q_lora_rank": 768, "kv_lora_rank": 512,
    "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256, "n_routed_experts": 16,
    "num_experts_per_tok": 4, "vocab_size": 32768, "rope_theta": 1e6, "max_position_embeddings": 202752,
    "num_nextn_predict_layers": 0,
}  # fmt: skip
FULL = SMALL | {"num_hidden_layers": 47, "n_routed_experts": 64, "vocab_size": 154880}
CONFIGS = {"tiny": {"max_position_embeddings": 202752, "num_nextn_predict_layers": 0}, "small": SMALL, "full": FULL}
FIT_LIMIT_GB = 80.0


@dataclass
class EngineResult:
    name: str
    prefill_tokens_per_s: dict[int, float] = field(default_factory=dict)  # prompt length -> tok/s
    decode_ms: dict[int, float] = field(default_factory=dict)  # context -> median ms per token
    batch_decode_tokens_per_s: dict[int, float] = field(default_factory=dict)  # batch -> aggregate tok/s
    kernels_per_decode_step: dict[str, int] = field(default_factory=dict)  # how the step ran -> count
    top_kernels: list[dict] = field(default_factory=list)  # of the profiled decode step
    fit: dict = field(default_factory=dict)  # the --fit-context check
    peak_memory_mb: float = 0.0
    weights_mb: float = 0.0
    decode_weight_bytes: int = 0  # weights one batch-1 decode step reads (see decode_weight_bytes)
    experts_implementation: str | None = None  # transformers' MoE backend
    cache_layout: str | None = None  # what transformers' DynamicCache holds
    errors: dict[str, str] = field(default_factory=dict)  # measurement -> what went wrong

    def decode_tokens_per_s(self) -> dict[int, float]:
        return {c: 1000.0 / ms for c, ms in self.decode_ms.items()}

    def decode_weight_gb_per_s(self) -> dict[int, float]:
        """Weight bytes a decode step reads over its time: how close it runs to memory bandwidth."""
        return {c: self.decode_weight_bytes / ms / 1e6 for c, ms in self.decode_ms.items()}


# ----- memory and time -----


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


def release(device: str) -> None:
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()


def profile_step(step, device: str, top: int = 12) -> tuple[int, list[dict]]:
    """Kernels one call of `step` launches on the GPU (top-level ops on a CPU), and the costliest.

    Run after a warm-up call. Copies and memsets are not counted as kernels.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    if cuda:
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA
                  and not e.name.startswith(("Memcpy", "Memset", "[memory]"))]  # fmt: skip
        cost = {e.name: 0.0 for e in events}
        for e in events:
            cost[e.name] += e.device_time
    else:
        events = [e for e in prof.events() if e.cpu_parent is None and e.name.startswith("aten::")]
        cost = {e.name: 0.0 for e in events}
        for e in events:
            cost[e.name] += e.cpu_time_total
    counts = Counter(e.name for e in events)
    ranked = sorted(cost, key=cost.get, reverse=True)[:top]
    return len(events), [{"name": n[:120], "calls": counts[n], "us": round(cost[n], 1)} for n in ranked]


# ----- the two engines behind one small interface -----


class GlmcodeEngine:
    def __init__(self, path: Path, args, cache_tokens: int):
        self.result = EngineResult("glmcode")
        self.device = args.device
        start_mb = reset_peak_memory(args.device)
        options = dict(kv_cache_memory=kv_bytes(path, cache_tokens, args.dtype), enable_prefix_caching=False,
                       max_num_seqs=max(args.batch_sizes, default=1), kernel_path=args.kernel_path or None)  # fmt: skip
        if args.config == "full":  # the real-size model (60 GB of bf16) is never written: random weights in place
            self.llm = LLM.from_model(random_model(path, args), Tokenizer(path), **options)
        else:
            self.llm = LLM(path, device=args.device, dtype=args.dtype, progress=False, **options)
        fill_random_latents(self.llm.kv_cache)  # decode contexts are random latents
        self.vocab = self.llm.num_real_tokens
        self.result.weights_mb = weights_mb(self.llm.model)
        self.result.decode_weight_bytes = decode_weight_bytes(self.llm.model, self.llm.config)
        self.prefill(list(range(32)))  # warm-up
        for batch in sorted({1, *args.batch_sizes}):  # every decode bucket: Triton compiles, graphs captured
            decoder = self.decoder(16, torch.Generator().manual_seed(0), batch)
            decoder.step()
            decoder.close()
        decoder = self.decoder(max(args.contexts), torch.Generator().manual_seed(0))
        decoder.step()  # the largest context, so that peak memory covers it
        decoder.close()
        self.result.peak_memory_mb = peak_memory_mb(args.device) - start_mb

    def prefill(self, prompt: list[int]) -> float:
        """Seconds to the first token: the prefill and one sample."""
        return timed(lambda: self.llm.generate(prompt, SamplingParams(max_tokens=1, temperature=0)), self.device)

    def decoder(self, context: int, gen: torch.Generator, batch: int = 1) -> GlmcodeDecoder:
        return GlmcodeDecoder(self.llm, context, gen, batch)

    def close(self) -> None:
        del self.llm


class GlmcodeDecoder:
    """Decode steps of `batch` sequences whose first `context` cache slots hold random latents."""

    def __init__(self, llm: LLM, context: int, gen: torch.Generator, batch: int = 1):
        self.llm, self.gen = llm, gen
        self.sampler = Sampler(SamplingParams(temperature=0), llm.num_real_tokens)
        self.seqs = []
        for _ in range(batch):
            tokens = torch.randint(0, llm.num_real_tokens, (context,), generator=gen).tolist()
            seq = Sequence(token_ids=tokens, num_prompt_tokens=context)
            assert llm.blocks.allocate(seq, use_prefix_cache=False), "the bench's KV cache is too small"
            seq.num_computed = context  # its cache slots already hold (random) latents
            self.seqs.append(seq)

    @torch.inference_mode()
    def step(self) -> None:
        for seq in self.seqs:
            self.llm.blocks.grow(seq, len(seq))
        logits = self.llm.runner.decode(self.seqs)
        for seq, row in zip(self.seqs, logits):
            self.sampler(row)
            seq.num_computed = len(seq)
            seq.token_ids.append(int(torch.randint(0, self.llm.num_real_tokens, (1,), generator=self.gen)))

    @torch.inference_mode()
    def eager_step(self) -> None:
        """The same step launched op by op (the kernel path without its CUDA graph)."""
        self.llm.runner.decode_eager(self.seqs)

    def close(self) -> None:
        for seq in self.seqs:
            self.llm.blocks.free_sequence(seq)


class TransformersEngine:
    def __init__(self, path: Path, args, cache_tokens: int):
        from transformers import AutoConfig, Glm4MoeLiteForCausalLM
        from transformers.utils import logging

        logging.set_verbosity_error()
        self.result = EngineResult("transformers")
        self.device = args.device
        start_mb = reset_peak_memory(args.device)
        dtype = getattr(torch, args.dtype)
        if args.device == "cuda":  # random weights made on the device, experts through torch._grouped_mm
            with torch.device("cuda"):
                config = AutoConfig.from_pretrained(path)
                try:
                    self.model = Glm4MoeLiteForCausalLM._from_config(config, dtype=dtype, experts_implementation="grouped_mm")
                except (TypeError, ValueError):  # a transformers without the option: its default
                    self.model = Glm4MoeLiteForCausalLM._from_config(config, dtype=dtype)
        else:
            self.model = Glm4MoeLiteForCausalLM.from_pretrained(path, dtype=dtype)
        self.model = self.model.to(args.device).eval()
        self.result.experts_implementation = getattr(self.model.config, "_experts_implementation", None)
        self.vocab = self.model.config.vocab_size
        self.cache_layout = transformers_cache_layout(self.model, self.device)
        self.result.cache_layout = self.cache_layout.name
        self.result.weights_mb = weights_mb(self.model)
        self.prefill(list(range(32)))  # warm-up
        decoder = self.decoder(16, torch.Generator().manual_seed(0))
        decoder.step()
        decoder.close()
        self.result.peak_memory_mb = peak_memory_mb(args.device) - start_mb

    @torch.inference_mode()
    def prefill(self, prompt: list[int]) -> float:
        from transformers import DynamicCache

        ids = torch.tensor([prompt], device=self.device)
        cache = {self.cache_layout.keyword: DynamicCache(config=self.model.config)}
        return timed(lambda: self.model(input_ids=ids, **cache, use_cache=True).logits[:, -1].argmax(-1), self.device)

    def decoder(self, context: int, gen: torch.Generator, batch: int = 1) -> TransformersDecoder:
        return TransformersDecoder(self.model, self.cache_layout, context, gen, self.device, batch)

    def close(self) -> None:
        del self.model


@dataclass(frozen=True)
class CacheLayout:
    """What transformers' DynamicCache holds per layer for this model, and forward's name for it.

    Recent versions cache the latent ([B, 1, S, 512] and [B, 1, S, 64]) and re-expand it every
    step; older ones cache expanded per-head keys and values. Read off a two-token forward.
    """

    keyword: str  # "cache" or "past_key_values"
    key_heads: int
    key_dim: int
    value_heads: int
    value_dim: int

    @property
    def name(self) -> str:
        return "latent" if self.key_heads == 1 else "expanded per-head keys and values"


@torch.inference_mode()
def transformers_cache_layout(model, device: str) -> CacheLayout:
    import inspect

    from transformers import DynamicCache

    keyword = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache(config=model.config)
    model(input_ids=torch.tensor([[0, 1]], device=device), use_cache=True, **{keyword: cache})
    if hasattr(cache, "layers"):
        keys, values = cache.layers[0].keys, cache.layers[0].values
    else:
        keys, values = cache.key_cache[0], cache.value_cache[0]
    return CacheLayout(keyword, keys.shape[1], keys.shape[3], values.shape[1], values.shape[3])


class TransformersDecoder:
    """Decode steps through forward() with a DynamicCache holding `context` random entries per row."""

    def __init__(self, model, layout: CacheLayout, context: int, gen: torch.Generator, device: str, batch: int = 1):
        from transformers import DynamicCache

        self.model, self.layout, self.gen, self.device = model, layout, gen, device
        self.position, self.batch = context, batch
        self.cache = DynamicCache(config=model.config)
        for layer in range(model.config.num_hidden_layers):
            keys = torch.randn(batch, layout.key_heads, context, layout.key_dim, dtype=model.dtype, device=device)
            values = torch.randn(batch, layout.value_heads, context, layout.value_dim, dtype=model.dtype, device=device)
            self.cache.update(keys, values, layer)

    @torch.inference_mode()
    def step(self) -> None:
        tokens = torch.randint(0, self.model.config.vocab_size, (self.batch, 1), generator=self.gen).to(self.device)
        positions = torch.full((self.batch, 1), self.position, device=self.device)
        self.model(input_ids=tokens, position_ids=positions, use_cache=True,
                   **{self.layout.keyword: self.cache}).logits.argmax(-1)  # fmt: skip
        self.position += 1

    def close(self) -> None:
        del self.cache


def weights_mb(model: torch.nn.Module) -> float:
    return sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20


def decode_weight_bytes(model: torch.nn.Module, config) -> int:
    """Bytes of weights a batch-1 decode step reads: all but the embedding (one row), and of
    each layer's routed experts only the top-k share. Both engines hold the same weights."""
    total = 0
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        if "embed_tokens" in name:
            continue
        nbytes = tensor.numel() * tensor.element_size()
        if ".mlp.experts." in name:
            nbytes = nbytes * config.num_experts_per_tok // config.n_routed_experts
        total += nbytes
    return total


def kv_bytes(path: Path, tokens: int, dtype: str) -> int:
    config = json.loads((path / "config.json").read_text())
    element = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    per_token = config["num_hidden_layers"] * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * element
    return (tokens + 512) * per_token


def cache_tokens_needed(args, contexts: list[int]) -> int:
    """Cache slots for the largest set of sequences alive at once (each rounded up to 256 tokens)."""
    steps = max(args.decode_steps, args.hf_decode_steps) + 4

    def rounded(tokens: int) -> int:
        return -(-tokens // 256) * 256

    single = max([*contexts, *args.prefill_tokens, args.fit_context]) + steps
    batched = [batch * rounded(args.batch_context + steps) for batch in args.batch_sizes]
    return max([rounded(single), *batched])


def fill_random_latents(kv_cache) -> None:
    """Random cache contents, layer by layer (an fp8 cache gets random values and unit scales)."""
    for layer in kv_cache.data:
        if layer.dtype == torch.float8_e4m3fn:
            layer.copy_(torch.randn(layer.shape, device=layer.device).to(layer.dtype))
        else:
            layer.normal_()
    if kv_cache.scales is not None:
        kv_cache.scales.fill_(1.0)


# ----- measurements -----


def attempt(engine, label: str, measure):
    """Runs one measurement; an error (e.g. out of memory) is recorded and the others still run."""
    try:
        return measure()
    except (RuntimeError, torch.OutOfMemoryError) as error:
        engine.result.errors[label] = f"{type(error).__name__}: {str(error)[:300]}"
        print(f"  {engine.result.name:<13} {label}: {engine.result.errors[label]}", flush=True)
        release(engine.device)
        return None


def measure_prefill(engines: list, args) -> None:
    """Per prompt length, the engines take turns run by run; the fastest run counts."""
    gen = torch.Generator().manual_seed(2)
    for length in args.prefill_tokens:
        times: dict[str, list[float]] = {e.result.name: [] for e in engines}
        for _ in range(args.prefill_repeats):
            prompt = torch.randint(0, min(e.vocab for e in engines), (length,), generator=gen).tolist()
            for engine in engines:
                seconds = attempt(engine, f"prefill {length}", lambda engine=engine: engine.prefill(prompt))
                if seconds is not None:
                    times[engine.result.name].append(seconds)
        for engine in engines:
            if times[engine.result.name]:
                engine.result.prefill_tokens_per_s[length] = length / min(times[engine.result.name])
                print(f"  {engine.result.name:<13} prefill {length}: "
                      f"{engine.result.prefill_tokens_per_s[length]:10.1f} tok/s", flush=True)  # fmt: skip
        release(args.device)


def measure_decode(engines: list, contexts: list[int], args) -> None:
    """Per context, the engines take turns in rounds of a few decode steps.

    The first step of each turn is not timed: it would measure how the other engine left the
    caches and the allocator, not this engine.
    """
    gen = torch.Generator().manual_seed(1)
    for context in contexts:
        for engine, times in _timed_turns(engines, context, 1, gen, args).items():
            engine.result.decode_ms[context] = 1000 * statistics.median(times)
            print(f"  {engine.result.name:<13} ctx {context:>6}: {engine.result.decode_ms[context]:8.2f} ms/token", flush=True)


def measure_batch_decode(engines: list, args) -> None:
    gen = torch.Generator().manual_seed(3)
    for batch in args.batch_sizes:
        for engine, times in _timed_turns(engines, args.batch_context, batch, gen, args).items():
            engine.result.batch_decode_tokens_per_s[batch] = batch / statistics.median(times)
            print(f"  {engine.result.name:<13} batch {batch:>3} @ {args.batch_context}: "
                  f"{engine.result.batch_decode_tokens_per_s[batch]:8.1f} tok/s aggregate", flush=True)  # fmt: skip


def _timed_turns(engines: list, context: int, batch: int, gen: torch.Generator, args) -> dict:
    """Seconds per decode step for each engine whose decoder could be built."""
    steps = {"glmcode": args.decode_steps, "transformers": args.hf_decode_steps}
    label = f"decode ctx {context} batch {batch}"
    decoders = {engine: attempt(engine, label, lambda engine=engine: engine.decoder(context, gen, batch))
                for engine in engines}  # fmt: skip
    decoders = {engine: decoder for engine, decoder in decoders.items() if decoder is not None}
    times: dict = {engine: [] for engine in decoders}
    for _ in range(args.rounds):
        for engine, decoder in decoders.items():
            turn = math.ceil(steps[engine.result.name] / args.rounds)
            attempt(engine, label, lambda d=decoder, t=times[engine], n=turn: _turn(d, t, n, args.device))
    for decoder in decoders.values():
        decoder.close()
    release(args.device)
    return {engine: t for engine, t in times.items() if t}


def _turn(decoder, times: list[float], steps: int, device: str) -> None:
    decoder.step()
    for _ in range(steps):
        times.append(timed(decoder.step, device))


def measure_kernels(engine, args) -> None:
    """Kernels of one batch-1 decode step at context 512: replayed and eager for the kernel path."""
    decoder = engine.decoder(min(512, max(args.contexts)), torch.Generator().manual_seed(4))
    decoder.step()
    variants = {"step": decoder.step}
    if isinstance(decoder, GlmcodeDecoder) and isinstance(decoder.llm.runner, CudaRunner):
        variants = {"graph replay" if decoder.llm.runner.use_graphs else "padded step": decoder.step,
                    "eager": decoder.eager_step}  # fmt: skip
    for name, step in variants.items():
        step()
        count, top = profile_step(step, args.device)
        engine.result.kernels_per_decode_step[name] = count
        if not engine.result.top_kernels or name == "eager":
            engine.result.top_kernels = top
        print(f"  {engine.result.name:<13} kernels per decode step ({name}): {count}", flush=True)
    decoder.close()


def measure_fit(engine, args) -> None:
    """A full context beside the weights: at --fit-context tokens, prefill the last chunk (its
    expanded attention spans the whole context) and decode; peak memory against 80 GB."""
    llm, context = engine.llm, args.fit_context
    release(args.device)  # blocks cached by earlier measurements do not count
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    decoder = engine.decoder(context - 1, torch.Generator().manual_seed(5))
    (seq,) = decoder.seqs
    chunk = llm.options.prefill_chunk_tokens
    seq.num_computed = max(0, context - 1 - chunk)
    with torch.inference_mode():
        prefill_s = timed(lambda: llm.runner.logits(llm.runner.prefill(seq, seq.num_computed, len(seq))[-1:]), args.device)
    seq.num_computed = len(seq)
    seq.token_ids.append(0)
    times: list[float] = []
    _turn(decoder, times, 4, args.device)
    decoder.close()
    fit = {"context": context, "prefill_chunk_tokens": chunk,
           "last_chunk_prefill_s": round(prefill_s, 3), "decode_ms": round(1000 * statistics.median(times), 2),
           "cache_tokens": llm.blocks.num_blocks * llm.block_size, "kv_cache_gb": round(llm.kv_cache.data.nbytes / 1e9, 2),
           "weights_gb": round(engine.result.weights_mb * 2**20 / 1e9, 2)}  # fmt: skip
    if args.device == "cuda":
        free, total = torch.cuda.mem_get_info()
        fit |= {"peak_allocated_gb": round(torch.cuda.max_memory_allocated() / 1e9, 2),
                "peak_reserved_gb": round(torch.cuda.max_memory_reserved() / 1e9, 2),
                "device_in_use_gb": round((total - free) / 1e9, 2)}  # fmt: skip
        fit["fits_80GB"] = fit["peak_reserved_gb"] <= FIT_LIMIT_GB  # in use: other processes too
    else:
        fit["peak_rss_gb"] = round(_proc_status_mb("VmHWM:") * 2**20 / 1e9, 2)
    engine.result.fit = fit
    print(f"  {engine.result.name:<13} fit at {context}: {fit}", flush=True)


def measure(engines: list, contexts: list[int], args) -> None:
    measure_prefill(engines, args)
    measure_decode(engines, contexts, args)
    measure_batch_decode(engines, args)
    for engine in engines:
        attempt(engine, "kernel count", lambda engine=engine: measure_kernels(engine, args))
        if args.fit_context and isinstance(engine, GlmcodeEngine):
            attempt(engine, "fit", lambda engine=engine: measure_fit(engine, args))


# ----- main -----


def write_checkpoint(config_name: str, out: Path, dtype: str, with_weights: bool) -> Path:
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    return writer.make_tiny_checkpoint(
        out, num_shards=2, dtype=getattr(torch, dtype), with_weights=with_weights, **CONFIGS[config_name]
    )


def random_model(path: Path, args) -> GlmMoeLite:
    """The model of the checkpoint's config with random weights (--config full writes none)."""
    config = ModelConfig.from_dir(path)
    model = build_model(config, resolve_dtype(args.dtype, config), torch.device(args.device))
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.normal_(0, 0.02)
    return model


def print_table(results: list[EngineResult], contexts: list[int], args) -> None:
    ours, hf = results[0], (results[1] if len(results) > 1 else None)

    def theirs(metric: dict, key):
        return hf and metric(hf).get(key)

    rows = []
    for n in args.prefill_tokens:
        rows.append((f"prefill tok/s @ {n}", ours.prefill_tokens_per_s.get(n), theirs(lambda r: r.prefill_tokens_per_s, n), True))
    for c in contexts:
        rows.append((f"decode tok/s @ {c}", ours.decode_tokens_per_s().get(c), theirs(lambda r: r.decode_tokens_per_s(), c), True))
    for b in args.batch_sizes:
        rows.append((f"batch {b} tok/s @ {args.batch_context}", ours.batch_decode_tokens_per_s.get(b),
                     theirs(lambda r: r.batch_decode_tokens_per_s, b), True))  # fmt: skip
    for c in contexts:
        rows.append((f"decode ms/token @ {c}", ours.decode_ms.get(c), theirs(lambda r: r.decode_ms, c), False))
    for c in contexts:
        rows.append((f"decode weight GB/s @ {c}", ours.decode_weight_gb_per_s().get(c),
                     theirs(lambda r: r.decode_weight_gb_per_s(), c), True))  # fmt: skip
    for name, count in ours.kernels_per_decode_step.items():
        hf_count = hf and next(iter(hf.kernels_per_decode_step.values()), None)
        rows.append((f"kernels/step ({name})", count, hf_count, False))
    rows.append(("peak memory MiB", ours.peak_memory_mb, hf and hf.peak_memory_mb, False))
    rows.append(("weights MiB", ours.weights_mb, hf and hf.weights_mb, False))
    print()
    print(f"{'metric':<30}{'glmcode':>14}{'transformers':>14}{'ratio':>9}")
    for name, a, b, higher_is_better in rows:
        ratio = f"{(a / b if higher_is_better else b / a):8.2f}x" if a and b else ""
        print(f"{name:<30}{(f'{a:.2f}' if a else '-'):>14}{(f'{b:.2f}' if b else '-'):>14}{ratio:>9}")
    if ours.fit:
        print(f"\nfit check: {ours.fit}")
    for result in results:
        for label, error in result.errors.items():
            print(f"{result.name} {label}: {error}")


def run_cpu_quant(args) -> None:
    """The quantized CPU bench (owned by the quantization code), with this script's flags.

    It always uses the real per-layer shapes (64 experts, full vocabulary); --config picks only
    the number of layers: full 47, small 4, tiny 1.
    """
    spec = importlib.util.spec_from_file_location("bench_cpu_quant", ROOT / "scripts" / "bench_cpu_quant.py")
    module = sys.modules["bench_cpu_quant"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    layers = args.layers or {"full": FULL["num_hidden_layers"], "small": SMALL["num_hidden_layers"], "tiny": 1}[args.config]
    contexts = ",".join(map(str, args.contexts)) if args.contexts else ("512,4096,32768" if args.long_context else "512,4096")
    forwarded = ["--quantization", args.quantization, "--layers", str(layers), "--contexts", contexts,
                 "--decode-steps", str(args.decode_steps), "--prefill-tokens", str(args.prefill_tokens[0])]  # fmt: skip
    forwarded += ["--threads", str(args.threads)] if args.threads else []
    forwarded += ["--json", str(args.json)] if args.json else []
    if args.against:  # llama.cpp side by side, the engines taking turns round by round
        forwarded += ["--against", args.against, "--rounds", str(args.rounds)]
        forwarded += ["--gguf", str(args.gguf)] if args.gguf else []
    module.main(forwarded)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="glmcode engine vs HF transformers")
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--config", choices=sorted(CONFIGS), default="small")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    parser.add_argument("--contexts", type=ints, default=None,
                        help="batch-1 decode context lengths (default 512,4096,16384; with --quantization 512,4096)")
    parser.add_argument("--long-context", action="store_true", help="with --quantization: also decode at 32K (slow)")
    parser.add_argument("--layers", type=int, default=None,
                        help="with --quantization: fewer decoder layers than --config has, for a quick check")
    parser.add_argument("--prefill-tokens", type=ints, default=[512], help="prompt lengths for prefill")
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--batch-sizes", type=ints, default=[], help="aggregate decode at these batch sizes")
    parser.add_argument("--batch-context", type=int, default=512, help="context of each sequence of a batch")
    parser.add_argument("--fit-context", type=int, default=0, help="decode at this context and check peak memory")
    parser.add_argument("--decode-steps", type=int, default=16, help="timed glmcode decode steps per context")
    parser.add_argument("--hf-decode-steps", type=int, default=8,
                        help="timed transformers decode steps (its step time varies more than ours)")
    parser.add_argument("--rounds", type=int, default=4, help="turns each engine takes per context")
    parser.add_argument("--skip-hf", action="store_true", help="glmcode only")
    parser.add_argument("--kernel-path", action="store_true", help="the CUDA path's code even on a CPU")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path, default=None, help="default: bench-results/engine-CONFIG-DEVICE.json")
    parser.add_argument("--quantization", choices=["int4", "int4-all", "int8"], default=None,
                        help="CPU quantized weights, random in quantized form: runs scripts/bench_cpu_quant.py")
    parser.add_argument("--against", choices=["llama.cpp"], default=None,
                        help="with --quantization (default int4-all): llama.cpp on a GGUF of the same shapes, "
                             "same prompts, taking turns (needs pip install -e '.[bench]')")
    parser.add_argument("--gguf", type=Path, default=None, help="with --against: keep llama.cpp's GGUF here (reused)")
    args = parser.parse_args()
    if args.against and not args.quantization:
        args.quantization = "int4-all"
    return args


def main() -> None:
    args = parse_args()
    if args.quantization:
        run_cpu_quant(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    contexts = args.contexts = args.contexts or [512, 4096, 16384]
    cache_tokens = cache_tokens_needed(args, contexts)
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else (os.uname().machine + " cpu")
    print(f"device: {device_name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-") as tmp:
        started = time.perf_counter()
        # The real-size model (60 GB of bf16) is never written: its weights are filled in place.
        in_place = args.config == "full"
        path = write_checkpoint(args.config, Path(tmp), args.dtype, with_weights=not in_place)
        if in_place:
            args.skip_hf = args.skip_hf or args.device == "cpu"  # transformers would need its own copy
        print(f"random {args.config} checkpoint written in {time.perf_counter() - started:.0f}s", flush=True)
        makers = [GlmcodeEngine] + ([] if args.skip_hf else [TransformersEngine])
        results = []
        if args.device == "cuda":  # one after the other: two copies of the weights may not fit
            for make in makers:
                engine = make(path, args, cache_tokens)
                measure([engine], contexts, args)
                results.append(engine.result)
                engine.close()
                del engine
                release(args.device)
        else:
            engines = [make(path, args, cache_tokens) for make in makers]
            measure(engines, contexts, args)
            results = [engine.result for engine in engines]

    for result in results[1:]:  # the same weights
        result.decode_weight_bytes = results[0].decode_weight_bytes
    print_table(results, contexts, args)
    report = {
        "config": args.config,
        "device": args.device,
        "device_name": device_name,
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(),
        "torch": torch.__version__,
        "engines_ran": "one after the other" if args.device == "cuda" else "interleaved",
        "decode_context_fill": "random latents written into each engine's own cache",
        "decode_timing": "median of timed steps; the first step of a turn untimed",
        "kernel_count": "CUDA kernels of one batch-1 decode step at context 512 (top-level aten ops on a CPU)",
        "peak_memory": "peak increase over the memory in use before loading (RSS on CPU)",
        "decode_weight_gb_per_s": "weight bytes one decode step reads (glmcode's count, same weights for both) "
                                  "over its median time: against the machine's memory bandwidth",
        "results": [{**r.__dict__, "decode_tokens_per_s": r.decode_tokens_per_s(),
                     "decode_weight_gb_per_s": r.decode_weight_gb_per_s()} for r in results],
    }
    if len(results) == 2:
        ours, hf = results
        report["speedup_decode"] = {c: hf.decode_ms[c] / ours.decode_ms[c] for c in contexts
                                    if c in hf.decode_ms and c in ours.decode_ms}  # fmt: skip
        report["speedup_batch_decode"] = {b: ours.batch_decode_tokens_per_s[b] / hf.batch_decode_tokens_per_s[b]
                                          for b in args.batch_sizes if b in hf.batch_decode_tokens_per_s
                                          and b in ours.batch_decode_tokens_per_s}  # fmt: skip
        report["speedup_prefill"] = {n: ours.prefill_tokens_per_s[n] / hf.prefill_tokens_per_s[n]
                                     for n in args.prefill_tokens if n in hf.prefill_tokens_per_s
                                     and n in ours.prefill_tokens_per_s}  # fmt: skip
    out = args.json or ROOT / "bench-results" / f"engine-{args.config}-{args.device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"\nJSON: {out}")


if __name__ == "__main__":
    main()
