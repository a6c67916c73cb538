"""Our C++ kernels for quantized matmuls on CPU (cpu_quant.cpp), and their weight layout.

The extension is built in one of two forms, for the CPU it runs on:

- AVX-512 (with VNNI): everything. Products of many rows (a prefill chunk, a chunk's routed
  experts grouped by expert) run on AMX-INT8 tiles where the CPU has them (cpu_prefill.cpp),
  over the same packed weights. It also holds the fused decode step (cpu_decode.cpp, driven by
  fused_decode.py), the kernels of the model's elementwise ops (cpu_ops.cpp: norms, rope, silu,
  the prefill softmax; see engine/ops.py) and a prefill chunk's attention on AMX-BF16 tiles
  (cpu_attention.cpp).
- AVX2 (AMD Zen 2/3, Intel client cores): the quantized products (cpu_quant.cpp and the grouped
  experts of cpu_prefill.cpp) on the same layouts, the fused decode over int4 / int8 weights
  and a bfloat16 or float32 cache (its attention in float32), and a prefill chunk's attention
  in 16-bit fixed point (cpu_attention_avx2.cpp, the same op as cpu_attention.cpp's); the rest
  runs on torch ops.

Both build on the kernels of cpu_kernels.h (cpu_kernels_avx512.h / cpu_kernels_avx2.h). The
extension is compiled on first use with torch's C++ extension machinery and cached. Where it
cannot be used (no AVX2, no compiler, a failed build, or ``GLMCODE_CPU_KERNELS=0``),
:func:`available` is False and the quantized modules fall back to the aten packed-weight ops.
``GLMCODE_CPU_KERNELS=avx2`` builds the AVX2 form on an AVX-512 CPU (to test or compare it).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import mmap
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from glmcode.engine.cpu.features import has_avx2, has_vnni

if TYPE_CHECKING:
    from glmcode.engine.kv_cache import LayerCache

TILE = 16
_HERE = Path(__file__).parent
# (extension name, sources, compiler flags) of each form
_BUILDS = {
    "avx512": (
        "glmcode_cpu_quant",
        ["cpu_quant.cpp", "cpu_prefill.cpp", "cpu_attention.cpp", "cpu_decode.cpp", "cpu_ops.cpp", "cpu_softmax.cpp"],
        ["-O3", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mfma", "-mf16c"],
    ),
    "avx2": (
        "glmcode_cpu_quant_avx2",
        ["cpu_quant.cpp", "cpu_prefill.cpp", "cpu_decode.cpp", "cpu_softmax.cpp", "cpu_attention_avx2.cpp"],
        ["-O3", "-mavx2", "-mfma", "-mf16c"],
    ),
}
# at::parallel_for is inline OpenMP: without -fopenmp the kernels would run on one thread. The
# libgomp it links is the one torch has already loaded (same soname), so there is one pool.
_OPENMP = ["-fopenmp"]
log = logging.getLogger(__name__)


def _wanted_build() -> str | None:
    """The form this CPU (and ``GLMCODE_CPU_KERNELS``) calls for, or None."""
    setting = os.environ.get("GLMCODE_CPU_KERNELS", "1")
    if setting == "0":
        return None
    if has_vnni() and setting != "avx2":
        return "avx512"
    return "avx2" if has_avx2() else None


@functools.cache
def build() -> str | None:
    """``"avx512"`` or ``"avx2"`` once that form of the extension is built and loaded (first call
    compiles, ~20 s, then cached); None where there is none."""
    form = _wanted_build()
    if form is None:
        return None
    name, sources, flags = _BUILDS[form]
    # Loading a cached build takes about a second; one still loading after a few is compiling.
    notice = threading.Timer(5.0, lambda: print("glmcode: compiling the CPU kernels (once; about a minute)...",
                                                file=sys.stderr, flush=True))
    notice.daemon = True
    if sys.stderr.isatty():
        notice.start()
    try:
        from torch.utils.cpp_extension import load

        load(
            name=name,
            sources=[str(_HERE / source) for source in sources],
            extra_cflags=flags + _OPENMP,
            extra_ldflags=_OPENMP,
            is_python_module=False,
        )
    except Exception as exc:  # no compiler, no ninja, a compile error: use the aten ops instead
        log.warning("glmcode CPU kernels unavailable, using aten ops: %s", str(exc).splitlines()[0])
        return None
    finally:
        notice.cancel()
    if os.environ.get("GLMCODE_AMX", "1") == "0":
        torch.ops.glmcode_cpu.set_amx_products(False)
    return form


def available() -> bool:
    """True once the extension is built and loaded, in either form: the quantized products."""
    return build() is not None


def avx512_available() -> bool:
    """True once the AVX-512 form is loaded: also the elementwise ops (see has_op) and the
    prefill attention kernels."""
    return build() == "avx512"


@functools.cache
def has_op(name: str) -> bool:
    """Whether the loaded form has ``torch.ops.glmcode_cpu.<name>``: the AVX-512 form has every
    op of ops.py marked cpu=..., the AVX2 form the attention softmax only."""
    return available() and hasattr(torch.ops.glmcode_cpu, name)


def ops():
    """The extension's ops (``torch.ops.glmcode_cpu``); builds it on first use."""
    if not available():
        raise RuntimeError("glmcode CPU kernels are not available on this machine")
    return torch.ops.glmcode_cpu


def amx_available() -> bool:
    """Whether many-row products can run on AMX-INT8 tiles here (the CPU has them, the kernel
    grants them, the extension is built)."""
    return available() and ops().amx_products_available()


@contextlib.contextmanager
def amx_products(enabled: bool) -> Iterator[None]:
    """Runs the block with the AMX products on or off (off: the vector kernels take every product)."""
    previous = ops().set_amx_products(enabled)
    try:
        yield
    finally:
        ops().set_amx_products(previous)


def _pad_rows(t: torch.Tensor, value: float = 0) -> torch.Tensor:
    pad = -t.shape[0] % TILE
    return F.pad(t, (0, 0) * (t.dim() - 1) + (0, pad), value=value) if pad else t


def _tiles_of_rows(per_row: torch.Tensor) -> torch.Tensor:
    """``[N, G]`` per-row-and-group values to ``[N/16, G, 16]``."""
    rows = _pad_rows(per_row)
    return rows.reshape(-1, TILE, rows.shape[1]).transpose(1, 2).contiguous()


def pack_int4(nibbles: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Portable nibbles ``uint8 [N, K/2]`` and bf16 ``[N, G]`` scales/zeros to the kernel layout."""
    packed = ops().pack_int4_nibbles(nibbles)
    return packed, _tiles_of_rows(scales.to(torch.bfloat16)), _tiles_of_rows(zeros.to(torch.bfloat16))


def pack_int8(values: torch.Tensor, scales: torch.Tensor, group: int) -> tuple[torch.Tensor, ...]:
    """``values int8 [N, K]`` and f32 ``[N]`` scales to the kernel layout (+ per-group sums)."""
    packed, sums = ops().pack_int8_values(values, group)
    padded_scales = F.pad(scales.float(), (0, packed.shape[0] * TILE - scales.shape[0]))
    return packed, padded_scales.contiguous(), sums


def int4_linear(x: torch.Tensor, packed, scales, zeros, group: int) -> torch.Tensor:
    return ops().int4_linear(x, packed, scales, zeros, group)


def int8_linear(x: torch.Tensor, packed, scales, sums, group: int) -> torch.Tensor:
    return ops().int8_linear(x, packed, scales, sums, group)


def latent_attention_available() -> bool:
    """Whether a prefill chunk's absorbed attention can run in one kernel call here: on AMX-BF16
    tiles (cpu_attention.cpp), or in 16-bit fixed point on AVX2 (cpu_attention_avx2.cpp)."""
    return has_op("latent_attention") and ops().latent_attention_available()


def latent_attention(
    q_latent: torch.Tensor, q_rope: torch.Tensor, scale: float, limits: torch.Tensor, cache: LayerCache,
    context_slots: torch.Tensor, out: torch.Tensor,
) -> None:
    """Absorbed attention of query rows over cached latents, on AMX-BF16 tiles or AVX2, into ``out``.

    The rows are head-major (h, i): q_latent [H, t, L] (the queries already multiplied by W_UK)
    and q_rope [H, t, R'] (the roped part), bf16 or float32, each row contiguous, and both are
    multiplied by ``scale`` on the way in; limits [H * t] int64: row r attends the context
    positions 0..limits[r]; context_slots [S] int64: the cache slot of each position. ``out``
    [H, t, L] (bf16 or float32, rows contiguous; a view into a larger tensor is fine) gets the
    softmax-weighted latents, computed in one pass without a score matrix.
    """
    ops().latent_attention(q_latent, q_rope, scale, limits, cache.flat, cache.scales, context_slots, out)


def activation_group(in_features: int) -> int:
    """The activation quantization group for the int8 kernel: 128 inputs where they divide."""
    for size in (128, 64, 32, 16, 8):
        if in_features % size == 0:
            return size
    raise ValueError(f"in_features must be a multiple of 8, got {in_features}")


_HUGE_PAGE = 2 << 20


def in_huge_pages(tensor: torch.Tensor) -> torch.Tensor:
    """A copy of a CPU tensor in memory the kernel may back with 2 MB pages (Linux transparent
    huge pages, which are often enabled only on request).

    Decode streams every weight from memory once per token; with 4 KB pages the hardware
    prefetcher stops at each page and the TLB misses, which costs a single core 10-20% of its
    read bandwidth here. Tensors under 2 MB, and other platforms, are returned as they are.
    """
    nbytes = tensor.numel() * tensor.element_size()
    if tensor.device.type != "cpu" or nbytes < _HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return tensor
    region = mmap.mmap(-1, nbytes + _HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -torch.frombuffer(region, dtype=torch.uint8).data_ptr() % _HUGE_PAGE
    # Only whole 2 MB pages inside the tensor are advised: the tail stays in small pages, so no
    # memory past the tensor's end is ever faulted in.
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % _HUGE_PAGE)
    # A storage of exactly the tensor's bytes (it keeps the mapping alive), so that saving the
    # model (weights/snapshot.py) writes no more than the tensor.
    raw = torch.frombuffer(region, dtype=torch.uint8, offset=start, count=nbytes)
    copy = raw.view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy
