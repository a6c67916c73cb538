"""CPU speed of the quantized engine at GLM-4.7-Flash's real shapes, with random weights, and
llama.cpp on the same shapes in the same run.

glmcode's weights are generated directly in quantized form (no 60 GB checkpoint) and handed to
`LLM.from_model`; with `--against llama.cpp` a GGUF of the same shapes is written (Q4_0, a Q6_K
output, as `llama-quantize Q4_0` makes; see llama_cpp_side.py) and llama-cpp-python runs it on
the same token ids. Each engine measures in a process of its own (the full-size models do not
fit the machine twice), and the engines take turns, round by round, so that a busy machine
slows both alike. A round measures:

- load_s: building glmcode's random quantized model / loading the GGUF (from page cache or disk)
- prefill_P: P prompt tokens from an empty cache, to the last token's logits
- prefill_P_at_D: P more tokens after D cached ones (llama-bench's pp P @ d D)
- decode_C: one token after C cached ones (median of --decode-steps steps)
- peak_rss_gb: the process's peak resident memory

Cached contexts are random: random latents in glmcode's cache, random keys in llama.cpp's
(through its sequence-state API); a step's cost does not depend on the values. Prints a table
(medians, ranges over every sample of every round, ratios of the medians) and JSON.

    python scripts/bench_cpu_quant.py --quantization int4-all [--layers 4] [--against llama.cpp] [--rounds 3]
    python scripts/bench_engine.py --config full --quantization int4-all --against llama.cpp --long-context

`--against llama.cpp` needs the benchmark extra (`pip install -e ".[bench]"`). A full-size run
needs ~19 GB free per engine: the script refuses to start with less (see --force).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from glmcode.engine import LLM  # noqa: E402
from glmcode.engine.config import ModelConfig  # noqa: E402
from glmcode.engine.model import GlmMoeLite  # noqa: E402
from glmcode.engine.quant.formats import Int4Weight, Int8Weight, QuantizedWeight, QuantScheme, int4_group_size  # noqa: E402
from glmcode.engine.quant.checkpoint import quantized_tensors, write_quantized_checkpoint  # noqa: E402
from glmcode.engine.quant.loader import QuantizedModelBuilder  # noqa: E402
from glmcode.engine.sequence import Sequence  # noqa: E402
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

FULL_GB = 19.0  # peak RSS of one full-size engine, with a margin
ENGINES = ("glmcode", "llama.cpp")
# higher is better for speeds, lower for the rest (ratios say how many times better glmcode is)
LOWER_IS_BETTER = ("load_s", "peak_rss_gb")


def peak_rss_gb() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def available_gb() -> float:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def prompt_ids(count: int, vocab: int, seed: int) -> list[int]:
    """The same token ids for both engines (3 and up: llama.cpp's placeholder vocabulary starts
    with three merge tokens)."""
    return np.random.default_rng(seed).integers(3, vocab, count).tolist()


# ----- glmcode's side


def build_llm(config: dict, quantization: str, directory: Path, max_context: int, **options) -> LLM:
    """An LLM over random quantized weights; the directory holds only config and tokenizer.
    options: LLM options (default: no prefix cache)."""
    write_tokenizer(directory)
    (directory / "config.json").write_text(json.dumps(config))
    model = random_quantized_model(ModelConfig.from_dict(config), QuantScheme.named(quantization))
    kv_bytes = config["num_hidden_layers"] * (max_context + 512) * (config["kv_lora_rank"] + config["qk_rope_head_dim"]) * 2
    llm = LLM.from_model(model, Tokenizer(directory), kv_cache_memory=kv_bytes, **({"enable_prefix_caching": False} | options))
    if llm.kv_cache.scales is None:
        llm.kv_cache.data.normal_()
    else:  # int8 latents of about unit size: values over the whole range, a scale of 1/40
        llm.kv_cache.data.random_(-127, 128)
        llm.kv_cache.scales.fill_(1 / 40)
    return llm


def write_tokenizer(directory: Path) -> None:
    """The test checkpoints' GLM tokenizer (scripts/make_tiny_checkpoint.py) into ``directory``."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", ROOT / "scripts" / "make_tiny_checkpoint.py")
    writer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(writer)
    writer.make_tokenizer().save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast"}))


def random_quantized_model(config: ModelConfig, scheme: QuantScheme, *, seed: int = 0) -> GlmMoeLite:
    """A model of `config`'s shapes with random weights made directly in quantized form: no
    float weights and no checkpoint on disk are ever needed."""
    builder = QuantizedModelBuilder(config, torch.bfloat16, torch.device("cpu"))
    for name, value in random_weights(builder, scheme, seed):
        builder.place(name, value)
    return builder.finish()


def write_random_quantized_checkpoint(config: dict, quantization: str, directory: Path, *, seed: int = 0) -> Path:
    """The same random weights as a quantized checkpoint on disk (the real download's stand-in),
    with the test tokenizer; written tensor by tensor, so memory stays bounded."""
    scheme = QuantScheme.named(quantization)
    builder = QuantizedModelBuilder(ModelConfig.from_dict(config), torch.bfloat16, torch.device("meta"))
    side = directory.with_name(directory.name + ".side")
    side.mkdir(parents=True, exist_ok=True)
    write_tokenizer(side)
    groups = (
        {name: value.to(torch.bfloat16)} if isinstance(value, torch.Tensor) else quantized_tensors(name, [value])
        for name, value in random_weights(builder, scheme, seed)
    )
    return write_quantized_checkpoint(directory, config, scheme, groups, side_files=side)


def random_weights(builder: QuantizedModelBuilder, scheme: QuantScheme, seed: int) -> Iterator[tuple[str, torch.Tensor | QuantizedWeight]]:
    """(checkpoint name, tensor or quantized weight) for every weight of the builder's model."""
    generator = torch.Generator().manual_seed(seed)
    for name, slot in builder.slots.items():
        if slot.covers:  # the fused form of experts that come one by one
            continue
        bits = scheme.bits_for(name, slot.shape)
        yield name, random_tensor(slot.shape, generator) if bits is None else random_quantized(slot.shape, bits, scheme, generator)


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


class GlmcodeSide:
    """Times glmcode's runner directly: the chunks a prefill takes, then the last token's logits."""

    def __init__(self, args, config: dict, directory: Path, n_ctx: int):
        started = time.perf_counter()
        self.llm = build_llm(config, args.quantization, directory, n_ctx, kv_cache_dtype=args.kv_cache_dtype)
        self.load_s = time.perf_counter() - started
        self.vocab = config["vocab_size"]

    @torch.inference_mode()
    def prefill_at(self, depth: int, prompt: list[int]) -> float:
        """Seconds to prefill `prompt` after `depth` cached (random) tokens, to its last logits."""
        llm = self.llm
        seq = Sequence(token_ids=prompt_ids(depth, self.vocab, 7) + prompt, num_prompt_tokens=depth + len(prompt))
        assert llm.blocks.allocate(seq, use_prefix_cache=False), "the bench's KV cache is too small"
        seq.num_computed = depth
        try:
            started = time.perf_counter()
            chunk = llm.options.prefill_chunk_tokens
            for start in range(depth, len(seq), chunk):
                hidden = llm.runner.prefill(seq, start, min(len(seq), start + chunk))
            llm.runner.logits(hidden[-1:])
            return time.perf_counter() - started
        finally:
            llm.blocks.free_sequence(seq)

    @torch.inference_mode()
    def decode_steps(self, context: int, steps: int) -> list[float]:
        llm = self.llm
        seq = Sequence(token_ids=prompt_ids(context, self.vocab, 11), num_prompt_tokens=context)
        assert llm.blocks.allocate(seq, use_prefix_cache=False), "the bench's KV cache is too small"
        seq.num_computed = context  # its cache slots already hold random latents
        times = []
        try:
            for step in range(steps + 1):  # the first one untimed
                seq.token_ids.append(3 + step)
                llm.blocks.grow(seq, len(seq))
                started = time.perf_counter()
                llm.runner.decode([seq])
                times.append(time.perf_counter() - started)
                seq.num_computed = len(seq)
        finally:
            llm.blocks.free_sequence(seq)
        return times[1:]


# ----- llama.cpp's side


class LlamaCppSide:
    def __init__(self, args, config: dict, n_ctx: int):
        from llama_cpp_side import LlamaCppEngine

        self.engine = LlamaCppEngine(args.gguf, threads=args.threads, n_ctx=n_ctx)
        self.load_s = self.engine.load_s
        self.rng = np.random.default_rng(5)

    def prefill_at(self, depth: int, prompt: list[int]) -> float:
        if depth:
            self.engine.fill_context(depth, self.rng)
        else:
            self.engine.clear()
        return self.engine.prefill(prompt)

    def decode_steps(self, context: int, steps: int) -> list[float]:
        self.engine.fill_context(context, self.rng)
        times = [self.engine.decode_step(3 + step) for step in range(steps + 1)]
        return times[1:]


# ----- one round, in a process of its own


def measure_round(args) -> dict:
    """The measurements of one engine, in this process: {metric: [samples]}."""
    torch.set_num_threads(args.threads)
    config = FULL_CONFIG | {"num_hidden_layers": args.layers}
    n_ctx = max([args.depth + args.prefill_tokens, args.prefill_tokens] + [c + args.decode_steps + 8 for c in args.contexts])
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-quant-") as tmp:
        side = GlmcodeSide(args, config, Path(tmp), n_ctx) if args.round == "glmcode" else LlamaCppSide(args, config, n_ctx)
        prompt = prompt_ids(args.prefill_tokens, config["vocab_size"], 0)
        side.prefill_at(0, prompt[:16])  # warm-up
        samples: dict[str, list[float]] = {"load_s": [side.load_s]}
        for depth in [0] + ([args.depth] if args.depth else []):
            key = f"prefill_{args.prefill_tokens}" + (f"_at_{depth}" if depth else "")
            samples[key] = [args.prefill_tokens / side.prefill_at(depth, prompt) for _ in range(args.repeats)]
        for context in args.contexts:
            samples[f"decode_{context}"] = [1.0 / statistics.median(side.decode_steps(context, args.decode_steps))]
    samples["peak_rss_gb"] = [peak_rss_gb()]
    return samples


def run_round(engine: str, argv: list[str]) -> dict:
    """One round of `engine` in a fresh process: its samples, or {"error": ...} (a round killed
    for memory, say, is reported, and the other rounds still count)."""
    command = [sys.executable, __file__, *argv, "--round", engine]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1:] or [f"exit status {done.returncode} (killed: out of memory?)"]
        return {"error": reason[0]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(samples: list[float]) -> dict:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples), "samples": samples}


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
    for kernel in ("aten", "glmcode"):
        if kernel == "glmcode" and linear.select_kernel(4, torch.device("cpu")) != "glmcode":
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
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ints = lambda text: [int(v) for v in text.split(",") if v]  # noqa: E731
    parser.add_argument("--quantization", default="int4", choices=["int4", "int4-all", "int8"])
    parser.add_argument("--layers", type=int, default=FULL_CONFIG["num_hidden_layers"], help="fewer layers for a quick run")
    parser.add_argument("--contexts", type=ints, default=[512, 4096, 32768], help="decode context lengths")
    parser.add_argument("--decode-steps", type=int, default=8)
    parser.add_argument("--prefill-tokens", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4096, help="also prefill after this many cached tokens (0: no)")
    parser.add_argument("--repeats", type=int, default=2, help="prefills per round and depth")
    parser.add_argument("--rounds", type=int, default=1, help="turns each engine takes")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-dtype", choices=["int8"], default=None, help="glmcode's latent cache (default: bf16)")
    parser.add_argument("--against", choices=["llama.cpp"], default=None, help="time llama.cpp in the same run")
    parser.add_argument("--gguf", type=Path, default=None, help="llama.cpp's model: written here if missing (default: a temp file)")
    parser.add_argument("--force", action="store_true", help="run even where free memory looks too small")
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    parser.add_argument("--compare-kernels", action="store_true", help="only time aten ops vs ours per call")
    parser.add_argument("--round", choices=ENGINES, help=argparse.SUPPRESS)  # internal: one engine's round
    args = parser.parse_args(argv)
    if args.round:
        print(json.dumps(measure_round(args)))
        return {}
    torch.set_num_threads(args.threads)
    if args.compare_kernels:
        result = {"threads": torch.get_num_threads(), "load_average": os.getloadavg(), "median_us": compare_kernels()}
        print(json.dumps(result))
        return result
    need = FULL_GB * args.layers / FULL_CONFIG["num_hidden_layers"] + 1
    if available_gb() < need and not args.force:
        raise SystemExit(f"{available_gb():.1f} GB available, an engine of {args.layers} layers needs ~{need:.0f} GB: "
                         "wait for a quieter machine or pass --force")  # fmt: skip
    engines = ENGINES if args.against else ENGINES[:1]
    report: dict = {
        "quantization": args.quantization, "layers": args.layers, "threads": args.threads, "rounds": args.rounds,
        "kv_cache_dtype": args.kv_cache_dtype or "bfloat16",
        "load_average_start": os.getloadavg(), "available_gb_start": round(available_gb(), 1),
        "engines_ran": "one process per engine and round, taking turns",
        "cached_contexts": "random latents (glmcode) / random keys through the sequence-state API (llama.cpp)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="glmcode-bench-gguf-") as tmp:
        forwarded = list(argv)
        if args.against:
            import llama_cpp_side

            gguf = args.gguf or Path(tmp) / "glm47-flash-q4_0.gguf"
            if not gguf.exists():
                print(f"writing {gguf} ({args.layers} layers, Q4_0 + Q6_K output)...", file=sys.stderr, flush=True)
                llama_cpp_side.write_gguf(FULL_CONFIG | {"num_hidden_layers": args.layers}, gguf,
                                          progress=lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
            forwarded += ["--gguf", str(gguf)]
            report["llama_cpp"] = llama_cpp_side.version()
        samples = {engine: {} for engine in engines}
        for number in range(args.rounds):
            order = engines if number % 2 == 0 else engines[::-1]
            for engine in order:
                print(f"round {number + 1}/{args.rounds}: {engine}...", file=sys.stderr, flush=True)
                measured = run_round(engine, forwarded)
                if "error" in measured:
                    print(f"  {engine} round failed: {measured['error']}", file=sys.stderr, flush=True)
                    report.setdefault("failed_rounds", []).append({"round": number + 1, "engine": engine, **measured})
                    continue
                for key, values in measured.items():
                    samples[engine].setdefault(key, []).extend(values)
                print(f"  {json.dumps(measured)}", file=sys.stderr, flush=True)  # kept even if a later round fails
    report["load_average_end"] = os.getloadavg()
    report["engines"] = {engine: {key: summarize(values) for key, values in metrics.items()} for engine, metrics in samples.items()}
    if not all(report["engines"].values()):
        raise SystemExit(f"an engine has no complete round: {report.get('failed_rounds')}")
    if args.against:
        ours, theirs = report["engines"]["glmcode"], report["engines"]["llama.cpp"]
        report["ratios"] = {key: (theirs[key]["median"] / ours[key]["median"] if key in LOWER_IS_BETTER
                                  else ours[key]["median"] / theirs[key]["median"]) for key in ours if key in theirs}  # fmt: skip
    print_table(report)
    print(json.dumps(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def print_table(report: dict) -> None:
    engines = list(report["engines"])
    columns = "".join(f"{name + ' median':>18}{'range':>18}" for name in engines)
    print(f"\n{'metric':<24}{columns}{'ratio':>9}", file=sys.stderr)
    for key in report["engines"]["glmcode"]:
        unit = "" if key in LOWER_IS_BETTER else " tok/s"
        row = f"{key + unit:<24}"
        for name in engines:
            value = report["engines"][name].get(key)
            if value is None:
                row += f"{'-':>36}"
                continue
            spread = f"{value['min']:.2f}-{value['max']:.2f}"
            row += f"{value['median']:>18.2f}{spread:>18}"
        ratio = report.get("ratios", {}).get(key)
        print(row + (f"{ratio:>8.2f}x" if ratio else ""), file=sys.stderr)
    if "ratios" in report:
        print("(ratio: how many times better glmcode is, from the medians)", file=sys.stderr)
    print(f"load average {report['load_average_start']} -> {report['load_average_end']}, threads {report['threads']}",
          file=sys.stderr)  # fmt: skip


if __name__ == "__main__":
    main()
