"""Which of the instruction sets glmcode's CPU kernels use this CPU has (no torch, no build)."""

from __future__ import annotations

import functools
from pathlib import Path


@functools.cache
def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def has_avx2() -> bool:
    """AVX2 and FMA: what the AVX2 form of the kernels needs."""
    return " avx2" in _cpu_flags() and " fma" in _cpu_flags() and " f16c" in _cpu_flags()


def has_vnni() -> bool:
    """AVX-512 VNNI (and BW): what the int4 / int8 kernels need."""
    return " avx512_vnni" in _cpu_flags() and " avx512bw" in _cpu_flags()


def has_bf16_dot() -> bool:
    """AVX512_BF16 (bfloat16 dot products: the fused decode's bf16 weights)."""
    return " avx512_bf16" in _cpu_flags()


def has_amx() -> bool:
    """AMX tiles with bfloat16 (the attention of the fused decode)."""
    return " amx_bf16" in _cpu_flags() and " amx_tile" in _cpu_flags()


def has_amx_int8() -> bool:
    """AMX tiles with int8 (the many-row quantized products of prefill)."""
    return " amx_int8" in _cpu_flags() and " amx_tile" in _cpu_flags()


def cpu_features() -> list[str]:
    """The instruction sets our kernels use that this CPU has, by name."""
    features = {"AVX2": has_avx2(), "AVX-512 VNNI": has_vnni(), "AVX512_BF16": has_bf16_dot(), "AMX-BF16": has_amx(), "AMX-INT8": has_amx_int8()}
    return [name for name, present in features.items() if present]
