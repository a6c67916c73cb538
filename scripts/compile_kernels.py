"""Compile every Triton kernel ahead of time for a GPU target, on a machine without a GPU.

Catches what the interpreter cannot (type errors in lowering, unsupported conversions, shared
memory over the limit) and shows the register use and spills ptxas reports for each tile config,
so configs can be chosen before device time is spent. Prints JSON, one row per variant.

    PYTHONPATH=. python scripts/compile_kernels.py            # sm90 (H100/H200), all variants
    PYTHONPATH=. python scripts/compile_kernels.py --quick    # one variant per kernel
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import io
import json
import os
import re
import shutil
import sys
import tempfile
import time

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # ptxas -v output: registers and spills
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="compile_kernels_")  # a cache hit skips ptxas
atexit.register(shutil.rmtree, os.environ["TRITON_CACHE_DIR"], True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from glmcode.engine.cuda import triton_fused, triton_mla, triton_moe  # noqa: E402

FLOAT_ARGS = {"scale_log2", "eps", "scaling"}


def variants(quick: bool):
    """(label, kernel, pointer dtypes, constexprs, num_warps, num_stages)."""
    mla_ptrs = {"q_nope_ptr": "*bf16", "q_pe_ptr": "*bf16", "kv_ptr": "*bf16", "kv_scale_ptr": "*fp32",
                "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "partial_out_ptr": "*fp32",
                "partial_lse_ptr": "*fp32", "out_ptr": "*bf16"}
    mla_const = dict(PAGE_SIZE=64, LATENT_DIM=512, ROPE_DIM=64, BLOCK_H=32, BLOCK_N=32, NUM_SPLITS=4,
                     KV_SCALE_MODE=0, DOT_DTYPE=tl.bfloat16)
    mla_tiles = [(32, 8)] if quick else [(16, 4), (32, 4), (32, 8), (64, 8)]
    for block_n, warps in mla_tiles:
        yield (f"mla_decode bf16 block_n={block_n} warps={warps}", triton_mla._mla_decode_split_kernel,
               mla_ptrs, {**mla_const, "BLOCK_N": block_n}, warps, 2)
    if not quick:
        yield ("mla_decode bf16 one split", triton_mla._mla_decode_split_kernel, mla_ptrs,
               {**mla_const, "NUM_SPLITS": 1}, 8, 2)
    for mode, name in ((2, "per-token"), (1, "per-tensor")):
        yield (f"mla_decode fp8 {name}", triton_mla._mla_decode_split_kernel, {**mla_ptrs, "kv_ptr": "*fp8e4nv"},
               {**mla_const, "KV_SCALE_MODE": mode}, 8, 2)
    yield ("mla_decode merge", triton_mla._mla_decode_merge_kernel,
           {"partial_out_ptr": "*fp32", "partial_lse_ptr": "*fp32", "out_ptr": "*bf16"},
           dict(LATENT_DIM=512, NUM_SPLITS=4, BLOCK_S=4), 4, 1)

    yield ("moe_align", triton_moe._moe_align_kernel,
           {"topk_ids_ptr": "*i32", "sorted_pair_ids_ptr": "*i32", "block_expert_ptr": "*i32"},
           dict(BLOCK_M=16, BLOCK_E=128, CHUNK=64), 4, 1)
    moe_tiles = [(16, 64, 64, 4)] if quick else [(16, 64, 64, 4), (16, 128, 128, 4), (16, 128, 128, 8), (64, 128, 64, 8)]
    for block_m, block_n, block_k, warps in moe_tiles:
        tiles = dict(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_DTYPE=tl.bfloat16)
        label = f"block_m={block_m} block_n={block_n} block_k={block_k} warps={warps}"
        yield (f"moe gate_up {label}", triton_moe._moe_gate_up_kernel,
               {"x_ptr": "*bf16", "w13_ptr": "*bf16", "sorted_pair_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                "hidden_ptr": "*bf16"}, tiles, warps, 3)
        yield (f"moe down {label}", triton_moe._moe_down_kernel,
               {"hidden_ptr": "*bf16", "w2_ptr": "*bf16", "sorted_pair_ids_ptr": "*i32", "block_expert_ptr": "*i32",
                "topk_weights_ptr": "*fp32", "pair_out_ptr": "*bf16"}, tiles, warps, 3)

    norm_ptrs = {"x_ptr": "*bf16", "residual_ptr": "*bf16", "weight_ptr": "*bf16", "out_ptr": "*bf16", "summed_ptr": "*bf16"}
    yield ("add_rms_norm 2048", triton_fused._rms_norm_kernel, norm_ptrs, dict(HAS_RESIDUAL=True, BLOCK_D=2048), 4, 1)
    yield ("rope", triton_fused._rope_kernel,
           {"q_ptr": "*bf16", "k_ptr": "*bf16", "positions_ptr": "*i64", "cos_sin_ptr": "*fp32"},
           dict(HALF=32, BLOCK_H=32), 4, 1)
    yield ("silu_mul", triton_fused._silu_mul_kernel, {"gate_up_ptr": "*bf16", "out_ptr": "*bf16"},
           dict(BLOCK=1024), 4, 1)
    yield ("route_topk E=64 k=4 + shared", triton_fused._route_topk_kernel,
           {"logits_ptr": "*fp32", "bias_ptr": "*fp32", "ids_ptr": "*i32", "weights_ptr": "*fp32"},
           dict(TOP_K=4, WIDTH=5, BLOCK_E=64, BLOCK_SLOTS=8, NORMALIZE=True, HAS_SHARED=True), 1, 1)


def signature(kernel, pointers: dict[str, str], constexprs: dict) -> dict[str, str]:
    types = {}
    for name in kernel.arg_names:
        if name in constexprs:
            types[name] = "constexpr"
        elif name in pointers:
            types[name] = pointers[name]
        else:
            types[name] = "fp32" if name in FLOAT_ARGS else "i32"
    return types


def compile_variant(arch: int, label, kernel, pointers, constexprs, num_warps, num_stages) -> dict:
    source = triton.compiler.ASTSource(kernel, signature(kernel, pointers, constexprs), constexprs)
    log = io.StringIO()
    began = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                                      options={"num_warps": num_warps, "num_stages": num_stages})
    except Exception as error:
        return {"variant": label, "ok": False, "error": str(error)[-1500:]}
    ptxas = log.getvalue()
    registers = re.search(r"Used (\d+) registers", ptxas)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas)
    return {
        "variant": label,
        "ok": True,
        "compile_s": round(time.perf_counter() - began, 1),
        "shared_bytes": compiled.metadata.shared,
        "registers": int(registers.group(1)) if registers else None,
        "spill_store_bytes": int(spills.group(1)) if spills else None,
        "spill_load_bytes": int(spills.group(2)) if spills else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = sm90)")
    parser.add_argument("--quick", action="store_true", help="one tile config per kernel")
    args = parser.parse_args()
    rows = [compile_variant(args.arch, *variant) for variant in variants(args.quick)]
    print(json.dumps({"triton": triton.__version__, "arch": args.arch, "variants": rows}, indent=1))
    return 0 if all(row["ok"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
