"""The prepared device check: GPU kernels against their PyTorch references, the engine's CUDA path
against the CPU engine, the engine's full-size benchmark against transformers, kernel timings.

The device command (one H100 or H200; one call, under the 600 s limit of one command; on an H200
it took 140 s, the bench 60 s of it, before the MLA sweep timed split counts; give it timeout_s=590):
    GLMCODE_CPU_KERNELS=0 PYTHONPATH=. PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --sections checks,engine,bench,mla,moe,ops --out "$OUT/gpu_check.json"
(GLMCODE_CPU_KERNELS=0: the float32 CPU reference engine runs without building the C++ CPU kernels.)
Sections run in that order and the report is rewritten after each, so a cut-off run still returns
everything finished before the cut; a timing section that would start after --deadline-s is skipped.
Without the full-size bench (80 s on an H200): drop `bench` from --sections.
CPU smoke run of the same code with tiny shapes, in Triton's interpreter (about 15 s):
    PYTHONPATH=. python scripts/gpu_check.py --device cpu

Prints one JSON document: device, versions, `checks` (max error against the reference and a
pass flag per case; the exit status is 1 if any fails), `engine` (the bf16 engine on this device,
i.e. the CUDA kernel path with its graphs, against the float32 CPU engine on a tiny checkpoint:
greedy tokens for 32 steps and teacher-forced logits, also with an fp8 KV cache; graph replay
against eager launch; a batch against one at a time), `bench` (scripts/bench_engine.py --config
full --device cuda BENCH_ARGS: prefill 4K / 32K, batch-1 decode at 512 / 8K / 32K / 128K, batch
8 / 32 aggregate, kernels per decode step, peak memory, a 200K-token context beside the bf16
weights, and the same for transformers with grouped_mm experts, in the same run on the same GPU)
and `timings` (milliseconds per kernel call, eager and replayed from a CUDA graph, with the
reference in the same run and the effective bandwidth).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Shapes:
    heads: int
    latent: int
    rope: int
    block_size: int
    mla_cases: tuple[tuple[int, int], ...]  # (batch, context) timed
    experts: int
    hidden: int
    inter: int
    top_k: int
    moe_batches: tuple[int, ...]
    prefill_tokens: int
    iters: int  # calls per timing sample
    samples: int  # timing samples; the median is reported


REAL = Shapes(
    heads=20, latent=512, rope=64, block_size=64,
    mla_cases=((1, 512), (1, 8192), (1, 32768), (1, 131072), (8, 8192), (32, 8192)),
    experts=64, hidden=2048, inter=1536, top_k=4, moe_batches=(1, 8, 32), prefill_tokens=4096, iters=20, samples=5,
)
TINY = Shapes(
    heads=5, latent=32, rope=16, block_size=4,
    mla_cases=((1, 24), (2, 40)),
    experts=6, hidden=64, inter=32, top_k=2, moe_batches=(1, 3), prefill_tokens=20, iters=1, samples=1,
)

BF16_TOLERANCE = 3e-2
# The measurements in one bench run (full shapes, bf16, glmcode then transformers): batch-1
# decode at 512..128K, batch 8 / 32 aggregate, prefill 4K / 32K, kernels per step, a 200K fit.
BENCH_ARGS = ("--contexts 512,8192,32768,131072 --prefill-tokens 4096,32768 --prefill-repeats 2 "
              "--batch-sizes 8,32 --batch-context 512 --fit-context 200000 --decode-steps 24 "
              "--hf-decode-steps 3 --rounds 1")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--sections", default="checks,engine,mla,moe,ops",
                        help="comma-separated subset of checks,engine,bench,mla,moe,ops (run in that order)")
    parser.add_argument("--bench-args", default=BENCH_ARGS, help="arguments for scripts/bench_engine.py (bench section)")
    parser.add_argument("--bench-timeout", type=int, default=400, help="seconds the bench section may take at most")
    parser.add_argument("--deadline-s", type=int, default=570,
                        help="no section starts after this many seconds; the bench stops by then")
    parser.add_argument("--out", help="also write the JSON here")
    return parser.parse_args()


def main() -> int:
    args = parse_args()
    if args.device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"  # must precede the first triton import
    import torch
    import triton

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for the smoke run", file=sys.stderr)
        return 2
    shapes = REAL if device.type == "cuda" else TINY
    bench = Bench(torch, device, shapes)
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "shapes": asdict(shapes),
        "checks": [],
        "timings": {},
    }
    sections = set(args.sections.split(","))
    started = time.perf_counter()

    def time_left() -> float:
        return args.deadline_s - (time.perf_counter() - started)

    def run_bench() -> dict:
        bench.release_memory()  # the benchmark's engines need the GPU to themselves
        return engine_bench(args.bench_args, int(min(args.bench_timeout, time_left())))

    plan = [
        ("checks", lambda: report.__setitem__("checks", guarded(bench.run_checks, report, "checks") or [])),
        ("engine", lambda: report.__setitem__("engine", guarded(lambda: engine_check(device), report, "engine"))),
        ("bench", lambda: report.__setitem__("bench", guarded(run_bench, report, "bench"))),
        ("mla", lambda: report["timings"].__setitem__("mla_decode", guarded(bench.time_mla, report, "mla"))),
        ("moe", lambda: report["timings"].__setitem__("fused_moe", guarded(bench.time_moe, report, "moe"))),
        ("ops", lambda: report["timings"].__setitem__("small_ops", guarded(bench.time_small_ops, report, "ops"))),
    ]
    for section, run in plan:
        if section not in sections:
            continue
        if time_left() <= 0:
            report.setdefault("skipped", []).append(section)
            continue
        run()
        finish(report, started, args.out)
    print(json.dumps(report, indent=1))
    return 0 if report["all_checks_pass"] else 1


def finish(report: dict, started: float, out: str | None) -> None:
    """Settle the verdict and rewrite the report file (atomically) with what is done so far."""
    engine_checks = (report.get("engine") or {}).get("checks", [])
    report["all_checks_pass"] = not report.get("errors") and all(
        check["ok"] for check in report["checks"] + engine_checks)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    if out:
        partial = f"{out}.partial"
        with open(partial, "w") as handle:
            handle.write(json.dumps(report, indent=1) + "\n")
        os.replace(partial, out)


# The engine check's checkpoint: rope dims of 16 (tl.dot needs K >= 16 on a GPU), and every
# routed expert selected, so bf16 noise cannot flip a top-k choice (a flip moves the logits by
# ~1 in a random model; the fused MoE's routing is checked by the kernel checks above).
ENGINE_CHECKPOINT_ARGS = ("--seed", "0", "--set", "qk_rope_head_dim=16", "--set", "num_experts_per_tok=8")
# bf16 vs float32 logits on that checkpoint differ by ~0.035 (median) and at most ~0.07 per
# position (CPU measurements, both engine paths); a greedy mismatch where the reference's top two
# logits are closer than this is a tie, not an error.
NEAR_TIE = 0.1


def engine_check(device) -> dict:
    """The engine in bf16 on `device` (the CUDA kernel path) against the float32 CPU engine on a
    tiny random checkpoint, through the public API; then the kernel path's own consistency."""
    maker = ROOT / "scripts" / "make_tiny_checkpoint.py"
    try:
        from glmcode.engine import LLM, SamplingParams
    except ImportError as error:
        return {"skipped": f"the engine is not importable: {error}"}
    with tempfile.TemporaryDirectory() as checkpoint:
        subprocess.run([sys.executable, str(maker), checkpoint, *ENGINE_CHECKPOINT_ARGS], check=True, capture_output=True)
        reference = LLM(checkpoint, device="cpu", dtype="float32", progress=False)
        prompt = reference.tokenizer.encode("def fibonacci(n: int) -> int:\n    if n < 2:")
        params = SamplingParams(max_tokens=32, temperature=0, stop_token_ids=[])
        want = reference.generate(prompt, params).token_ids
        want_logits = reference.score(prompt + want).float()
        top2 = want_logits.topk(2, -1).values
        margins = top2[:, 0] - top2[:, 1]

        def compare(label: str, llm, noise: float = 1.0) -> list[dict]:
            """noise: how much more rounding this variant adds than bf16 (fp8 latents: about 2x)."""
            got = llm.generate(prompt, params).token_ids
            return [greedy_check(label, got, want, margins, len(prompt), noise * NEAR_TIE),
                    logits_check(label, llm.score(prompt + want).float(), want_logits, margins,
                                 noise * BF16_TOLERANCE, noise * NEAR_TIE)]  # fmt: skip

        cpu_bf16 = LLM(checkpoint, device="cpu", dtype="bfloat16", progress=False)
        baseline = compare("CPU engine bf16 (baseline, not checked)", cpu_bf16)
        # kernel_path: the default on CUDA; in the CPU smoke run, the same code on the references.
        on_device = {"device": device.type, "dtype": "bfloat16", "kernel_path": True, "progress": False}
        candidate = LLM(checkpoint, **on_device)
        fp8 = LLM(checkpoint, kv_cache_dtype="fp8", **on_device)
        checks = compare("bf16", candidate)
        checks += compare("bf16 + fp8 KV cache", fp8, noise=2.0)
        checks += decode_consistency_checks(candidate, prompt + want)
    return {
        "prompt_tokens": len(prompt),
        "checkpoint_args": " ".join(ENGINE_CHECKPOINT_ARGS),
        "kernel_path": candidate.runner is not None,
        "cuda_graph_buckets": sorted(candidate.runner.graphed.graphs) if candidate.runner else [],
        "baseline_cpu_bf16": baseline,
        "checks": checks,
    }


def greedy_check(label: str, got: list[int], want: list[int], margins, prompt_len: int, near_tie: float) -> dict:
    """Greedy tokens equal for 32 steps, or first differ where the reference itself is tied."""
    mismatch = next((i for i, (a, b) in enumerate(zip(want, got)) if a != b), None)
    margin = None if mismatch is None else round(margins[prompt_len - 1 + mismatch].item(), 4)
    return {"name": f"engine greedy 32 tokens, {label} vs fp32 CPU", "first_mismatch": mismatch,
            "reference_margin_there": margin, "tie_below": near_tie, "ok": mismatch is None or margin < near_tie}


def logits_check(label: str, got, want, margins, tolerance: float, near_tie: float) -> dict:
    """Teacher-forced logits: per-position error bounded, top-1 equal wherever it is not a tie."""
    import torch

    row_error = (got - want).abs().amax(-1)
    scale = want.abs().max().item()
    top1 = (got.argmax(-1) == want.argmax(-1))[margins > near_tie].float().mean().item()
    error = row_error.max().item()
    return {"name": f"engine logits, {label} vs fp32 CPU", "max_abs_err": error,
            "median_row_err": row_error.median().item(), "ref_max_abs": scale, "untied_top1_agreement": top1,
            "ok": bool(torch.isfinite(got).all()) and error <= tolerance * max(scale, 1.0) and top1 == 1.0}


def decode_consistency_checks(llm, tokens: list[int]) -> list[dict]:
    """Three sequences decoded in one padded bucket: graph replay == eager launch, and each row
    == that sequence decoded alone."""
    import torch

    from glmcode.engine.cuda.runner import CudaRunner
    from glmcode.engine.sequence import Sequence

    if not isinstance(llm.runner, CudaRunner):
        return []
    seqs = [Sequence(token_ids=tokens[:n], num_prompt_tokens=n) for n in (7, 19, len(tokens) - 1)]
    with torch.inference_mode():
        for seq in seqs:
            assert llm.blocks.allocate(seq)
            llm.runner.prefill(seq, seq.num_computed, len(seq))
            seq.num_computed = len(seq)
            seq.token_ids.append(tokens[len(seq)])
            assert llm.blocks.grow(seq, len(seq))
        replayed = llm.runner.decode(seqs).float().cpu()
        eager = llm.runner.decode_eager(seqs).float().cpu()
        alone = torch.cat([llm.runner.decode([seq]) for seq in seqs]).float().cpu()
    for seq in seqs:
        llm.blocks.free_sequence(seq)
    scale = max(eager.abs().max().item(), 1.0)
    graph_error = (replayed - eager).abs().max().item()
    batch_error = (replayed - alone).abs().max().item()
    return [
        {"name": "engine decode, CUDA graph replay vs eager (batch 3 in bucket 4)", "max_abs_err": graph_error,
         "ok": graph_error <= BF16_TOLERANCE * scale},  # cuBLAS may pick other algorithms under capture
        {"name": "engine decode, batch of 3 vs one at a time", "max_abs_err": batch_error,
         "ok": batch_error <= BF16_TOLERANCE * scale},
    ]


def engine_bench(extra_args: str, timeout_s: int) -> dict:
    """Run the engine's full-size benchmark (glmcode vs transformers) and keep its JSON."""
    script = ROOT / "scripts" / "bench_engine.py"
    with tempfile.TemporaryDirectory() as out_dir:
        out = Path(out_dir) / "bench.json"
        command = [sys.executable, str(script), "--config", "full", "--device", "cuda", "--json", str(out),
                   *extra_args.split()]
        try:
            completed = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, timeout=timeout_s)
            returncode, output = completed.returncode, completed.stdout + completed.stderr
        except subprocess.TimeoutExpired as expired:
            returncode = "timeout"
            output = (expired.stdout or b"").decode(errors="replace") + (expired.stderr or b"").decode(errors="replace")
        result = {"command": " ".join(command[1:]), "returncode": returncode, "output_tail": output[-6000:]}
        if out.exists():
            result["results"] = json.loads(out.read_text())
    return result


def guarded(run, report: dict, section: str):
    """Run one section; an exception is recorded and the remaining sections still run."""
    try:
        return run()
    except Exception:
        report.setdefault("errors", {})[section] = traceback.format_exc()[-3000:]
        return None


class Bench:
    """Random inputs of the chosen shapes, the correctness cases and the timers."""

    def __init__(self, torch, device, shapes: Shapes):
        from glmcode.engine import ops
        from glmcode.engine.cuda import moe, triton_fused, triton_mla, triton_moe

        self.torch, self.device, self.shapes = torch, device, shapes
        self.ops, self.cuda_moe = ops, moe  # the PyTorch references: ops.X.reference
        self.mla, self.moe, self.fused = triton_mla, triton_moe, triton_fused
        self.dtype = torch.bfloat16
        self.gen = torch.Generator(device="cpu").manual_seed(0)  # small index tensors
        self.device_gen = torch.Generator(device=device).manual_seed(0)  # large random tensors
        self._expert_weights = None

    # ---- inputs ------------------------------------------------------------------------------

    def release_memory(self) -> None:
        """Drop the cached expert stacks and hand freed blocks back to the driver."""
        import gc

        self._expert_weights = None
        gc.collect()
        if self.device.type == "cuda":
            self.torch.cuda.empty_cache()

    def randn(self, *shape, scale=1.0, dtype=None):
        values = self.torch.randn(*shape, generator=self.device_gen, device=self.device) * scale
        return values.to(dtype or self.dtype)

    def expert_weights(self):
        """w13, w2 for the routed experts plus the shared one (index E); made once (1.2 GB real)."""
        if self._expert_weights is None:
            s = self.shapes
            self._expert_weights = (
                self.randn(s.experts + 1, 2 * s.inter, s.hidden, scale=s.hidden**-0.5),
                self.randn(s.experts + 1, s.hidden, s.inter, scale=s.inter**-0.5),
            )
        return self._expert_weights

    def mla_inputs(self, seq_lens: list[int], block_size: int):
        torch, s = self.torch, self.shapes
        blocks_per_seq = max(-(-n // block_size) for n in seq_lens)
        num_blocks = len(seq_lens) * blocks_per_seq + 1
        tables = torch.randperm(num_blocks, generator=self.gen)[: len(seq_lens) * blocks_per_seq]
        return (
            self.randn(len(seq_lens), s.heads, s.latent),
            self.randn(len(seq_lens), s.heads, s.rope),
            self.randn(num_blocks, block_size, s.latent + s.rope),
            tables.view(len(seq_lens), blocks_per_seq).to(device=self.device, dtype=torch.int32),
            torch.tensor(seq_lens, dtype=torch.int32, device=self.device),
        )

    def moe_inputs(self, tokens: int):
        """Tokens routed to top_k distinct experts, plus the shared expert with weight 1."""
        torch, s = self.torch, self.shapes
        w13, w2 = self.expert_weights()
        ids = torch.stack([torch.randperm(s.experts, generator=self.gen)[: s.top_k] for _ in range(tokens)])
        weights = torch.rand(tokens, s.top_k, generator=self.gen) + 0.1
        ids, weights = ids.to(self.device, torch.int32), weights.to(self.device)
        ids, weights = self.ops.with_shared_expert(ids, weights, s.experts)
        return self.randn(tokens, s.hidden), w13, w2, ids, weights

    # ---- correctness -------------------------------------------------------------------------

    def compare(self, name: str, got, want, tolerance: float = BF16_TOLERANCE) -> dict:
        error = (got.float() - want.float()).abs().max().item()
        scale = max(want.float().abs().max().item(), 1.0)
        ok = bool(self.torch.isfinite(got).all()) and error <= tolerance * scale
        return {"name": name, "max_abs_err": error, "ref_max_abs": scale, "ok": ok}

    def run_checks(self) -> list[dict]:
        s = self.shapes
        checks = []
        for block_size in sorted({s.block_size, 16 if self.device.type == "cuda" else 1}):
            seq_lens = [1, 3 * block_size + 1, 300 if self.device.type == "cuda" else 13]
            inputs = self.mla_inputs(seq_lens, block_size)
            want = self.ops.mla_decode.reference(*inputs, 256**-0.5)
            for splits in (None, 1, 4):
                got = self.mla.mla_decode(*inputs, 256**-0.5, num_splits=splits)
                checks.append(self.compare(f"mla_decode bs={block_size} splits={splits}", got, want))
        checks += self.fp8_checks()
        for tokens in s.moe_batches:
            x, w13, w2, ids, weights = self.moe_inputs(tokens)
            want = self.ops.fused_moe.reference(x, w13, w2, ids, weights)
            aligned = self.moe.moe_align(ids, w13.shape[0], 16)
            want_aligned = self.cuda_moe.moe_align_reference(ids, w13.shape[0], 16)
            same = all(self.torch.equal(a, b) for a, b in zip(aligned, want_aligned))
            checks.append({"name": f"moe_align T={tokens}", "ok": same})
            checks.append(self.compare(f"fused_moe T={tokens} (+shared)", self.moe.fused_moe(x, w13, w2, ids, weights), want))
        if self.cuda_moe.grouped_mm_available(self.device):
            x, w13, w2, ids, weights = self.moe_inputs(s.prefill_tokens)
            want = self.ops.fused_moe.reference(x, w13, w2, ids, weights)
            checks.append(self.compare(f"grouped_moe T={s.prefill_tokens}", self.cuda_moe.grouped_moe(x, w13, w2, ids, weights), want))
            checks.append(self.compare(f"fused_moe T={s.prefill_tokens}", self.moe.fused_moe(x, w13, w2, ids, weights), want))
        checks += self.small_op_checks()
        if self.device.type == "cuda":
            checks += self.graph_checks()
        return checks

    def fp8_checks(self) -> list[dict]:
        from glmcode.engine.quant.latent_cache import quantize_fp8_per_token

        torch = self.torch
        q_nope, q_pe, cache, tables, lens = self.mla_inputs([5, 77], self.shapes.block_size)
        rows = cache.reshape(-1, cache.shape[-1])
        quantized, scales = quantize_fp8_per_token(rows)
        per_token = (quantized.view(cache.shape), scales.view(cache.shape[:2]))
        tensor_scale = torch.tensor([rows.float().abs().max().item() / 448.0], device=self.device)
        per_tensor_values = (rows.float() / tensor_scale).clamp(-448.0, 448.0).to(torch.float8_e4m3fn)
        per_tensor = (per_tensor_values.view(cache.shape), tensor_scale)
        checks = []
        for name, (fp8_cache, kv_scale) in (("per_token", per_token), ("per_tensor", per_tensor)):
            want = self.ops.mla_decode.reference(q_nope, q_pe, fp8_cache, tables, lens, 0.0625, kv_scale)
            got = self.mla.mla_decode(q_nope, q_pe, fp8_cache, tables, lens, 0.0625, kv_scale, num_splits=2)
            checks.append(self.compare(f"mla_decode fp8 {name}", got, want))
        return checks

    def small_op_checks(self) -> list[dict]:
        s, ops, fused = self.shapes, self.ops, self.fused
        x, residual, weight = self.randn(3, s.hidden), self.randn(3, s.hidden), self.randn(s.hidden)
        checks = [
            self.compare("rms_norm", fused.rms_norm(x, weight, 1e-5), ops.rms_norm.reference(x, weight, 1e-5)),
            self.compare("add_rms_norm", fused.add_rms_norm(x, residual, weight, 1e-5)[0],
                         ops.add_rms_norm.reference(x, residual, weight, 1e-5)[0]),
        ]
        gate_up = self.randn(3, 2 * s.inter)
        checks.append(self.compare("silu_mul", fused.silu_mul(gate_up), ops.silu_mul.reference(gate_up)))
        table = self.rope_table()
        positions = self.torch.tensor([0, 5, 4000], device=self.device)
        q, kv_a = self.randn(3, s.heads, 192 + s.rope), self.randn(3, s.latent + s.rope)
        want_q, want_kv_a = q.clone(), kv_a.clone()
        ops.rope_.reference(want_q[..., 192:], want_kv_a[:, s.latent:], positions, table)
        fused.rope_(q[..., 192:], kv_a[:, s.latent:], positions, table)
        checks.append(self.compare("rope q", q, want_q))
        checks.append(self.compare("rope k", kv_a, want_kv_a))
        return checks

    def rope_table(self):
        from glmcode.engine.model.layers import Rotary

        return Rotary(self.shapes.rope, 1e6, 4096).cos_sin(self.device)

    def graph_checks(self) -> list[dict]:
        """Capture once, then replay with new lengths / routing written into the static inputs."""
        torch = self.torch
        q_nope, q_pe, cache, tables, lens = self.mla_inputs([700, 4000], 64)
        replay = self.capture(lambda: self.mla.mla_decode(q_nope, q_pe, cache, tables, lens, 0.0625))
        lens.copy_(torch.tensor([4000, 33], dtype=torch.int32))
        tables.copy_(tables.flip(0))
        checks = [self.compare("mla_decode CUDA graph replay", replay(),
                               self.ops.mla_decode.reference(q_nope, q_pe, cache, tables, lens, 0.0625))]
        x, w13, w2, ids, weights = self.moe_inputs(8)
        replay = self.capture(lambda: self.moe.fused_moe(x, w13, w2, ids, weights))
        ids.copy_(ids.flip(0))
        x.copy_(self.randn(*x.shape))
        checks.append(self.compare("fused_moe CUDA graph replay", replay(),
                                   self.ops.fused_moe.reference(x, w13, w2, ids, weights)))
        checks.append(self.graphed_step_check())
        return checks

    def graphed_step_check(self) -> dict:
        """GraphedStep: a batch of 3 replayed in the bucket of 4 equals the eager reference."""
        from glmcode.engine.cuda.graphs import GraphedStep

        q_nope, q_pe, cache, tables, lens = self.mla_inputs([300] * 8, 64)

        def step(inputs):
            return self.mla.mla_decode(inputs["q_nope"], inputs["q_pe"], cache, inputs["block_tables"],
                                       inputs["seq_lens"], 0.0625)

        runner = GraphedStep(step, {"q_nope": q_nope, "q_pe": q_pe, "block_tables": tables, "seq_lens": lens},
                             pad_values={"seq_lens": 0}, buckets=(1, 4, 8))
        runner.capture()
        batch = {"q_nope": q_nope[:3], "q_pe": q_pe[:3], "block_tables": tables[5:8, :3],
                 "seq_lens": self.torch.tensor([1, 100, 190], dtype=self.torch.int32, device=self.device)}
        want = self.ops.mla_decode.reference(batch["q_nope"], batch["q_pe"], cache, batch["block_tables"],
                                             batch["seq_lens"], 0.0625)
        return self.compare("GraphedStep bucket 4, batch 3", runner(batch), want)

    # ---- timing ------------------------------------------------------------------------------

    def capture(self, fn):
        """Warm fn up (Triton compiles), capture it in a CUDA graph; returns a replay function."""
        torch = self.torch
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            output = fn()

        def replay():
            graph.replay()
            return output

        return replay

    def time_ms(self, fn) -> float:
        """Median milliseconds per call after a warm-up call."""
        torch, iters = self.torch, self.shapes.iters
        fn()
        samples = []
        for _ in range(self.shapes.samples):
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(iters):
                    fn()
                end.record()
                torch.cuda.synchronize()
                samples.append(start.elapsed_time(end) / iters)
            else:
                began = time.perf_counter()
                for _ in range(iters):
                    fn()
                samples.append((time.perf_counter() - began) * 1e3 / iters)
        return round(statistics.median(samples), 4)

    def timed_variants(self, eager, reference, bytes_moved: int) -> dict:
        row = {"triton_ms": self.time_ms(eager), "reference_ms": self.time_ms(reference)}
        if self.device.type == "cuda":
            try:
                row["triton_graph_ms"] = self.time_ms(self.capture(eager))
            except Exception as error:
                row["graph_error"] = repr(error)[:300]
        best = min(row.get("triton_graph_ms", row["triton_ms"]), row["triton_ms"])
        row["speedup_vs_reference"] = round(row["reference_ms"] / best, 2)
        row["effective_GBps"] = round(bytes_moved / (best * 1e-3) / 1e9, 1)
        return row

    def time_mla(self) -> list[dict]:
        s = self.shapes
        rows = []
        for batch, context in s.mla_cases:
            inputs = self.mla_inputs([context] * batch, s.block_size)
            cache_bytes = batch * context * (s.latent + s.rope) * 2
            splits = self.mla.default_num_splits(batch, s.heads, inputs[3].shape[1] * s.block_size, self.device)
            row = {"batch": batch, "context": context, "num_splits": splits}
            row.update(self.timed_variants(
                lambda: self.mla.mla_decode(*inputs, 0.0625),
                lambda: self.ops.mla_decode.reference(*inputs, 0.0625),
                cache_bytes,
            ))
            rows.append(row)
        rows.append({"sweep": self.sweep_mla()})
        return rows

    def sweep_mla(self) -> list[dict]:
        """Tile shapes and split counts at batch 1 on the two longest contexts, timed from a CUDA
        graph on a GPU (eager calls there cost a launch-bound ~0.17 ms whatever the shape)."""
        s, cuda = self.shapes, self.device.type == "cuda"
        tiles = [(16, 4), (32, 4), (32, 8), (64, 8)] if cuda else [(16, 4)]
        split_counts = (32, 64, 128) if cuda else (2, 4)
        results = []
        for batch, context in [case for case in s.mla_cases if case[0] == 1][-2:]:
            inputs = self.mla_inputs([context] * batch, s.block_size)
            for (block_n, warps), splits in itertools.product(tiles, split_counts):
                config = {"batch": batch, "context": context, "num_splits": splits, "block_n": block_n,
                          "num_warps": warps}
                run = lambda: self.mla.mla_decode(  # noqa: E731
                    *inputs, 0.0625, num_splits=splits, block_n=block_n, num_warps=warps)
                try:  # a config that does not compile (registers, shared memory) is a result too
                    results.append({**config, "ms": self.time_ms(self.capture(run) if cuda else run)})
                except Exception as error:
                    results.append({**config, "error": repr(error)[:200]})
        return results

    def time_moe(self) -> list[dict]:
        s = self.shapes
        expert_bytes = 3 * s.hidden * s.inter * 2
        rows = []
        for tokens in (*s.moe_batches, s.prefill_tokens):
            x, w13, w2, ids, weights = self.moe_inputs(tokens)
            experts_read = ids.unique().numel()
            row = {"tokens": tokens, "experts_read": experts_read}
            row.update(self.timed_variants(
                lambda: self.moe.fused_moe(x, w13, w2, ids, weights),
                lambda: self.ops.fused_moe.reference(x, w13, w2, ids, weights),
                experts_read * expert_bytes,
            ))
            if self.cuda_moe.grouped_mm_available(self.device):
                row["grouped_mm_ms"] = self.time_ms(lambda: self.cuda_moe.grouped_moe(x, w13, w2, ids, weights))
            rows.append(row)
        rows.append({"sweep": self.sweep_moe()})
        return rows

    def sweep_moe(self) -> list[dict]:
        x, w13, w2, ids, weights = self.moe_inputs(1)
        configs = ([(32, 128, 4), (64, 64, 4), (64, 128, 4), (128, 128, 8), (128, 64, 4)]
                   if self.device.type == "cuda" else [(16, 32, 4)])
        results = []
        for block_n, block_k, warps in configs:
            run = lambda: self.moe.fused_moe(  # noqa: E731
                x, w13, w2, ids, weights, block_n=block_n, block_k=block_k, num_warps=warps)
            try:
                results.append({"tokens": 1, "block_n": block_n, "block_k": block_k, "num_warps": warps,
                                "ms": self.time_ms(run)})
            except Exception as error:
                results.append({"block_n": block_n, "block_k": block_k, "error": repr(error)[:200]})
        return results

    def time_small_ops(self) -> list[dict]:
        s, ops, fused = self.shapes, self.ops, self.fused
        x, residual, weight = self.randn(1, s.hidden), self.randn(1, s.hidden), self.randn(s.hidden)
        gate_up = self.randn(1, 2 * s.inter)
        table = self.rope_table()
        q, kv_a, positions = self.randn(1, s.heads, s.rope), self.randn(1, s.latent + s.rope), self.torch.tensor([7], device=self.device)
        cases = {
            "add_rms_norm": (lambda: fused.add_rms_norm(x, residual, weight, 1e-5),
                             lambda: ops.add_rms_norm.reference(x, residual, weight, 1e-5)),
            "silu_mul": (lambda: fused.silu_mul(gate_up), lambda: ops.silu_mul.reference(gate_up)),
            "rope_q_and_k": (lambda: fused.rope_(q, kv_a[:, s.latent:], positions, table),
                             lambda: ops.rope_.reference(q, kv_a[:, s.latent:], positions, table)),
        }
        return [{"op": name, "triton_ms": self.time_ms(fast), "reference_ms": self.time_ms(slow)}
                for name, (fast, slow) in cases.items()]


if __name__ == "__main__":
    sys.exit(main())
