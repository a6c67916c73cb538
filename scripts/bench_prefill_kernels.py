"""The prefill products at GLM-4.7-Flash's real shapes: AMX against the paths it replaces.

Each product of a 512-token chunk runs on glmcode's AMX tiles, on its vector kernels (AMX turned
off: what a CPU without AMX gets), on aten's int4 packed op (the fallback without our kernels),
and as a bfloat16 F.linear of the dequantized weight (oneDNN, itself on AMX-BF16 here: the speed
of a full bf16 copy of the weights, which the 24 GB machine cannot hold). The routed experts run
as one grouped call (64 experts, 4 per token). A chunk's attention (20 heads, absorbed, over 0 and
4096 cached tokens) runs in one AMX-BF16 pass (cpu_attention.cpp; on AVX2, its int16 form,
cpu_attention_avx2.cpp, in the amx column) and as torch computes it piece
by piece (matmuls around a score matrix, in bf16, or in float32 where torch has no fast bf16
matmul, as the engine does: the path without AMX), each as a whole
SpanBatch.attend; and in the expanded form, as the modules take it for long chunks over short
contexts (keys expanded per piece, in the same dtype; expanded_is_cheaper): with --tokens, where
each form wins at each depth. Random weights; paths take turns, call by call.
Prints medians and ranges (ms) and the speedup of AMX over each other path, and JSON (an
attention path's GOP/s counts the absorbed form's arithmetic, whichever form it runs).

    python scripts/bench_prefill_kernels.py [--tokens 512] [--calls 7] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_cpu_quant import FULL_CONFIG  # noqa: E402

from glmcode.engine.config import ModelConfig  # noqa: E402
from glmcode.engine.cpu import kernels as cpu_kernels  # noqa: E402
from glmcode.engine.kv_cache import KVSpan, LayerCache, attention_dtype  # noqa: E402
from glmcode.engine.model.attention import MLAttention, SequenceSlice, SpanBatch  # noqa: E402
from glmcode.engine.quant import linear  # noqa: E402
from glmcode.engine.quant.experts import StackedInt4Experts  # noqa: E402
from glmcode.engine.quant.formats import Int4Weight, dequantize_int4  # noqa: E402

# (name, inputs, outputs) of the int4-all model's projections; the dense layer's gate_up is
# the largest product of a prefill chunk
PROJECTIONS = [
    ("q_a_proj", 2048, 768), ("q_b_proj", 768, 5120), ("kv_a_proj", 2048, 576), ("o_proj", 5120, 2048),
    ("shared gate_up", 2048, 3072), ("shared down", 1536, 2048), ("dense gate_up", 2048, 20480),
]  # fmt: skip
EXPERTS, HIDDEN, INTER, TOP_K = 64, 2048, 1536, 4


def random_int4(rows: int, cols: int, gen: torch.Generator) -> Int4Weight:
    nibbles = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    scales = (torch.rand(rows, cols // 128, generator=gen) * 1e-3).to(torch.bfloat16)
    return Int4Weight(nibbles, scales, torch.zeros_like(scales), 128)


def int4_module(weight: Int4Weight, kernel: str) -> torch.nn.Module:
    original = linear.select_kernel
    linear.select_kernel = lambda bits, device: kernel
    try:
        return linear.Int4Linear(weight, dtype=torch.bfloat16)
    finally:
        linear.select_kernel = original


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def paths_for(name: str, weight: Int4Weight, x: torch.Tensor) -> dict:
    ours = int4_module(weight, "glmcode")
    paths = {}
    if cpu_kernels.amx_available():
        paths["amx"] = lambda: _with_amx(True, lambda: ours(x))
    paths["vector"] = lambda: _with_amx(False, lambda: ours(x))
    if name != "dense gate_up":  # aten's op takes ~10 s there per call
        aten = int4_module(weight, "aten")
        paths["aten int4"] = lambda: aten(x)
    dense = dequantize_int4(weight, torch.bfloat16)
    paths["bf16 F.linear"] = lambda: F.linear(x, dense)
    return paths


def attention_paths(tokens: int, depth: int, gen: torch.Generator) -> tuple[int, dict]:
    """(multiply-adds x 2, paths) of a chunk's attention over `depth` cached tokens."""
    config = ModelConfig.from_dict(FULL_CONFIG)
    attn = MLAttention(config).to(torch.bfloat16)
    with torch.no_grad():
        for param in attn.kv_b_proj.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * param.shape[-1] ** -0.5)
    heads, context = config.num_attention_heads, depth + tokens
    read_dtype = attention_dtype(torch.bfloat16, torch.device("cpu"))  # float32 where torch has no fast bf16 matmul
    cache = LayerCache(torch.randn(context, config.kv_cache_dim, generator=gen).to(torch.bfloat16), None, 16, read_dtype,
                       config.kv_lora_rank)  # fmt: skip
    q_nope = torch.randn(tokens, heads, config.qk_nope_head_dim, generator=gen).to(torch.bfloat16)
    q_pe = torch.randn(tokens, heads, config.qk_rope_head_dim, generator=gen).to(torch.bfloat16)

    def attend(latent_attention, expanded: bool = False) -> torch.Tensor:
        batch = SpanBatch(positions=torch.arange(depth, context), write_slots=torch.arange(depth, context),
                          sequences=[SequenceSlice(slice(0, tokens), depth, [KVSpan(0, context)])],
                          expanded=expanded, latent_attention=latent_attention)  # fmt: skip
        return batch.attend(attn, q_nope, q_pe, cache)

    paths = {}
    if cpu_kernels.latent_attention_available():  # on AMX-BF16, or in the AVX2 form's int16 fixed point
        paths["amx" if cpu_kernels.avx512_available() else "avx2 int16"] = lambda: attend(cpu_kernels.latent_attention)
    paths[f"torch {'bf16' if read_dtype == torch.bfloat16 else 'float32'}"] = lambda: attend(None)
    paths["torch expanded"] = lambda: attend(None, expanded=True)
    pairs = heads * tokens * (depth + (tokens + 1) / 2)  # causal
    return int(2 * pairs * (config.kv_cache_dim + config.kv_lora_rank)), paths


def _with_amx(enabled: bool, fn):
    with cpu_kernels.amx_products(enabled):
        return fn()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--calls", type=int, default=7, help="timed calls per path and product")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    if not cpu_kernels.available():
        raise SystemExit("glmcode's CPU kernels are not available here")
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    report = {"tokens": args.tokens, "threads": args.threads, "load_average_start": os.getloadavg(), "products": {}}
    x = torch.randn(args.tokens, 5120, dtype=torch.bfloat16, generator=gen)
    cases = []
    for name, inputs, outputs in PROJECTIONS:
        weight = random_int4(outputs, inputs, gen)
        cases.append((name, 2 * args.tokens * inputs * outputs, paths_for(name, weight, x[:, :inputs].contiguous())))
    experts = StackedInt4Experts([random_int4(2 * INTER, HIDDEN, gen) for _ in range(EXPERTS)],
                                 [random_int4(HIDDEN, INTER, gen) for _ in range(EXPERTS)], dtype=torch.bfloat16)  # fmt: skip
    ids = torch.stack([torch.randperm(EXPERTS, generator=gen)[:TOP_K] for _ in range(args.tokens)])
    route = torch.rand(args.tokens, TOP_K, generator=gen)
    xe = x[:, :HIDDEN].contiguous()
    expert_paths = {"vector": lambda: _with_amx(False, lambda: experts(xe, ids, route))}
    if cpu_kernels.amx_available():
        expert_paths = {"amx": lambda: _with_amx(True, lambda: experts(xe, ids, route))} | expert_paths
    cases.append(("routed experts (grouped)", 2 * args.tokens * TOP_K * 3 * HIDDEN * INTER, expert_paths))
    for depth in (0, 4096):
        cases.append((f"attention @ {depth}", *attention_paths(args.tokens, depth, gen)))

    print(f"{'product':<26}{'path':<15}{'median ms':>11}{'range ms':>17}{'GOP/s':>8}{'amx speedup':>13}")
    for name, ops, paths in cases:
        for fn in paths.values():
            fn()  # warm-up
        samples = {path: [] for path in paths}
        for _ in range(args.calls):  # the paths take turns
            for path, fn in paths.items():
                samples[path].append(timed(fn))
        fast = samples.get("amx") or samples.get("avx2 int16")
        amx = statistics.median(fast) if fast else None
        report["products"][name] = {}
        for path, times in samples.items():
            median = statistics.median(times)
            speedup = median / amx if amx else None
            report["products"][name][path] = {"median_ms": median * 1e3, "min_ms": min(times) * 1e3,
                                              "max_ms": max(times) * 1e3, "gop_per_s": ops / median / 1e9,
                                              "amx_speedup": speedup}  # fmt: skip
            spread = f"{min(times) * 1e3:.1f}-{max(times) * 1e3:.1f}"
            print(f"{name:<26}{path:<15}{median * 1e3:>11.1f}{spread:>17}{ops / median / 1e9:>8.0f}"
                  f"{(f'{speedup:.2f}x' if speedup else ''):>13}")  # fmt: skip
    report["load_average_end"] = os.getloadavg()
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}")
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
