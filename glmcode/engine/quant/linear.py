"""Quantized projections: int8 / int4 linears and MLA's absorbed kv_b_proj halves in int8.

Each module turns the portable weight form (``formats.py``) into whatever the fastest kernel on
this machine wants when it is built: our kernels (``engine/cpu``, AVX-512 VNNI or AVX2; they quantize
activations to int8 per group of 128), else the aten packed-weight ops on CPU, else a plain
dequantize (other devices).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.kernels import in_huge_pages
from glmcode.engine.quant.formats import (
    Int4Weight,
    Int8Weight,
    QuantizedWeight,
    dequantize_int4,
    quantize_int8,
    unpack_nibbles,
)

_INT4_ROW_ALIGN = 16  # the aten int4 CPU packing wants N divisible by 16


def select_kernel(bits: int, device: torch.device) -> str:
    """``"glmcode"`` (our kernels), ``"aten"`` or ``"reference"``: the fastest kernel for ``bits`` on ``device``."""
    if device.type != "cpu":
        return "reference"
    if cpu_kernels.available():
        return "glmcode"
    aten = torch.ops.aten
    ops = ("_weight_int8pack_mm",) if bits == 8 else ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu")
    return "aten" if all(hasattr(aten, op) for op in ops) else "reference"


# ---------------------------------------------------------------------------------------------
# Linear modules


class _QuantizedLinear(nn.Module):
    """Shared plumbing: flatten leading dims, compute in ``compute_dtype``, restore the dtype."""

    def __init__(self, shape: tuple[int, int], dtype: torch.dtype, kernel: str):
        super().__init__()
        self.out_features, self.in_features = shape
        self.compute_dtype = dtype
        self.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, in_dtype = x.shape[:-1], x.dtype
        y = self.matmul(x.reshape(-1, self.in_features).to(self.compute_dtype).contiguous())
        return y[:, : self.out_features].reshape(*lead, self.out_features).to(in_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(_QuantizedLinear):
    """``y = x @ W.T`` with an int8 per-channel weight."""

    def __init__(self, weight: Int8Weight, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        device = torch.device(device)
        kernel = select_kernel(8, device)
        if kernel == "aten" and weight.shape[1] % 16:  # aten's int8 matmul crashes on such rows
            kernel = "reference"
        super().__init__(weight.shape, dtype, kernel)
        values = weight.values.to(device)
        if self.kernel == "glmcode":
            self.group = cpu_kernels.activation_group(self.in_features)
            packed, scales, sums = cpu_kernels.pack_int8(values, weight.scales, self.group)
            self.register_buffer("sums", sums)
        else:
            packed, scales = values.contiguous(), weight.scales.to(device=device, dtype=dtype)
        self.register_buffer("packed", in_huge_pages(packed))
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "glmcode":
            return cpu_kernels.int8_linear(x, self.packed, self.scales, self.sums, self.group)
        if self.kernel == "aten":
            return torch.ops.aten._weight_int8pack_mm(x, self.packed, self.scales)
        return F.linear(x, self.packed.to(self.compute_dtype)) * self.scales

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8, kernel={self.kernel}"


class Int4Linear(_QuantizedLinear):
    """``y = x @ W.T`` with an int4 group-wise weight."""

    def __init__(self, weight: Int4Weight, *, dtype: torch.dtype, device: torch.device | str = "cpu"):
        device = torch.device(device)
        super().__init__(weight.shape, dtype, select_kernel(4, device))
        self.group_size = weight.group_size
        if self.kernel == "glmcode":
            packed, scales, zeros = cpu_kernels.pack_int4(weight.nibbles, weight.scales, weight.zeros)
            self.register_buffer("zeros", zeros)
        elif self.kernel == "aten":
            packed, scales = _pack_int4_for_aten(weight, dtype)  # scales: [K/g, N, 2] with zeros
        else:
            packed, scales = weight.nibbles.to(device), weight.scales.to(device)
            self.register_buffer("zeros", weight.zeros.to(device))
        self.register_buffer("packed", in_huge_pages(packed))
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "glmcode":
            return cpu_kernels.int4_linear(x, self.packed, self.scales, self.zeros, self.group_size)
        if self.kernel == "aten":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, self.group_size, self.scales)
        weight = Int4Weight(self.packed, self.scales, self.zeros, self.group_size)
        return F.linear(x, dequantize_int4(weight, self.compute_dtype))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"int4 group_size={self.group_size}, kernel={self.kernel}"
        )


def _pack_int4_for_aten(weight: Int4Weight, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Portable int4 to the aten CPU layout: packed ``[N', K/2]`` and ``[K/g, N', 2]``.

    Rows are padded with zeros up to a multiple of 16 (``N'``); the forward slices them off.
    """
    rows = weight.nibbles.shape[0]
    pad = -rows % _INT4_ROW_ALIGN
    values = unpack_nibbles(weight.nibbles).to(torch.int32)
    scales, zeros = weight.scales, weight.zeros
    if pad:
        values = F.pad(values, (0, 0, 0, pad), value=8)
        scales, zeros = F.pad(scales, (0, 0, 0, pad)), F.pad(zeros, (0, 0, 0, pad))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values.contiguous(), 1)
    scales_and_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1).to(dtype).contiguous()
    return packed, scales_and_zeros


def quantized_linear(
    weight: QuantizedWeight, *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> Int8Linear | Int4Linear:
    if isinstance(weight, Int8Weight):
        return Int8Linear(weight, dtype=dtype, device=device)
    return Int4Linear(weight, dtype=dtype, device=device)


# ---------------------------------------------------------------------------------------------
# MLA's absorbed kv_b_proj halves


class Int8KVBProjection(nn.Module):
    """KVBProjection (W_UK transposed [N, L, P], W_UV [N, V, L]) with int8 per-row weights.

    Decode reads both halves of every layer for each token; in int8 that is half the bytes of
    bfloat16, and one kernel call covers all heads.
    """

    def __init__(self, w_uk_t: torch.Tensor, w_uv: torch.Tensor, *, dtype: torch.dtype):
        super().__init__()
        self.compute_dtype = dtype
        for name, weight in (("uk", w_uk_t), ("uv", w_uv)):
            group = cpu_kernels.activation_group(weight.shape[2])
            packs = [cpu_kernels.pack_int8(q.values, q.scales, group) for q in map(quantize_int8, weight)]
            setattr(self, f"{name}_group", group)
            setattr(self, f"{name}_rows", weight.shape[1])  # the kernel pads rows to whole tiles
            for i, part in enumerate(("packed", "scales", "sums")):
                self.register_buffer(f"{name}_{part}", in_huge_pages(torch.stack([p[i] for p in packs])))

    def _heads(self, name: str, x: torch.Tensor) -> torch.Tensor:
        packed, scales, sums = (getattr(self, f"{name}_{part}") for part in ("packed", "scales", "sums"))
        y = cpu_kernels.ops().int8_linear_heads(x.to(self.compute_dtype), packed, scales, sums, getattr(self, f"{name}_group"))
        return y[..., : getattr(self, f"{name}_rows")].to(x.dtype)

    def absorb_query(self, q_nope: torch.Tensor) -> torch.Tensor:
        return self._heads("uk", q_nope)

    def values(self, latent: torch.Tensor) -> torch.Tensor:
        return self._heads("uv", latent)

    def halves(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._dense("uk"), self._dense("uv")

    def _dense(self, name: str) -> torch.Tensor:
        """The weights back from the kernel layout: [H, N/16, K/4, (16, 4)] -> [H, N, K]."""
        packed, scales = getattr(self, f"{name}_packed"), getattr(self, f"{name}_scales")
        return cpu_kernels.ops().int8_dequantize(packed, scales, getattr(self, f"{name}_rows"), self.compute_dtype)


def kv_b_projection(weight: torch.Tensor, empty: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The attention's kv_b_proj module for ``weight`` [N * (P + V), L], given its ``empty``
    (meta) KVBProjection: int8 for our kernels on CPU, else that module filled in ``dtype``."""
    ours = select_kernel(8, device) == "glmcode"
    halves = type(empty)(*_kv_b_dims(empty)).to(device=device, dtype=torch.float32 if ours else dtype)
    halves.requires_grad_(False).load(weight.to(device=device, dtype=halves.w_uk_t.dtype))
    return Int8KVBProjection(halves.w_uk_t, halves.w_uv, dtype=dtype) if ours else halves


def _kv_b_dims(module: nn.Module) -> tuple[int, int, int, int]:
    heads, latent, nope = module.w_uk_t.shape
    return heads, latent, nope, module.w_uv.shape[1]
