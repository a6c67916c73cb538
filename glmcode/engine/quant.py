"""Weight-only int8 / int4 quantization for CPU inference.

Two weight formats, both stored in a portable, packing-independent form:

- int8, per output channel, symmetric: ``w[n, k] = values[n, k] * scales[n]``.
- int4, per group of ``group_size`` inputs, asymmetric:
  ``w[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g]`` with ``g = k // group_size`` and
  ``q`` in 0..15, packed two per byte (even ``k`` in the low nibble).
  The ``(q - 8) * s + z`` convention is the one ``aten._weight_int4pack_mm_for_cpu`` uses, so
  the portable form maps onto it without any rescaling.

The modules below turn the portable form into whatever the fastest available kernel wants when
they are built, so a checkpoint written once runs on any machine: our AVX-512 VNNI kernels
(``kernels/cpu_quant``; they also quantize activations to int8 per group of 128), else the aten
packed-weight ops on CPU, else a plain dequantize (other devices).
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine.kernels import cpu_quant

GROUP_SIZE = 128
_INT4_ROW_ALIGN = 16  # the aten int4 CPU packing wants N divisible by 16


@dataclass(frozen=True)
class Int8Weight:
    """int8 values ``[N, K]`` and float32 per-row scales ``[N]``."""

    values: torch.Tensor
    scales: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.values.shape)


@dataclass(frozen=True)
class Int4Weight:
    """Nibbles ``uint8 [N, K/2]``; bfloat16 ``scales`` and ``zeros`` ``[N, K/group_size]``."""

    nibbles: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return (self.nibbles.shape[0], self.nibbles.shape[1] * 2)


QuantizedWeight = Int8Weight | Int4Weight


@dataclass(frozen=True)
class QuantScheme:
    """Which checkpoint tensors get which bit width.

    ``expert_bits`` covers routed and shared experts; ``linear_bits`` every other projection
    (attention, the dense MLP, lm_head, the MTP projection). Embeddings, norms and the router
    stay as they are: they are small, or (the embedding) only gathered, never multiplied.
    """

    expert_bits: int = 4
    linear_bits: int = 8
    group_size: int = GROUP_SIZE

    @classmethod
    def named(cls, name: str) -> "QuantScheme":
        """``"int4"``: int4 experts, int8 elsewhere (quality first). ``"int4-all"``: int4
        everywhere (speed first: a third fewer bytes per token). ``"int8"``: int8 everywhere."""
        schemes = {
            "int4": cls(expert_bits=4, linear_bits=8),
            "int4-all": cls(expert_bits=4, linear_bits=4),
            "int8": cls(expert_bits=8, linear_bits=8),
        }
        if name not in schemes:
            raise ValueError(f"unknown quantization {name!r}; use one of {sorted(schemes)}")
        return schemes[name]

    def bits_for(self, name: str, shape: tuple[int, ...]) -> int | None:
        """The bit width for checkpoint tensor ``name``, or None to keep it unquantized."""
        if len(shape) != 2 or not name.endswith(".weight"):
            return None
        if "embed_tokens" in name or name.endswith(".mlp.gate.weight"):
            return None
        if name.endswith(".kv_b_proj.weight"):
            # Decode reads it as int8 per head in any scheme (Int8KVBProjection): int4 in the
            # checkpoint would only lose precision.
            return 8
        bits = self.expert_bits if ".experts." in name or ".shared_experts." in name else self.linear_bits
        # int4 groups need 32 | in_features; only toy shapes miss that, and they get int8.
        return 8 if bits == 4 and shape[1] % 32 else bits

    def to_dict(self) -> dict:
        return {"expert_bits": self.expert_bits, "linear_bits": self.linear_bits, "group_size": self.group_size}


# ---------------------------------------------------------------------------------------------
# Tensor-level quantize / dequantize


def quantize_int8(weight: torch.Tensor) -> Int8Weight:
    w = weight.float()
    scales = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    values = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return Int8Weight(values=values, scales=scales)


def dequantize_int8(q: Int8Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.values.float() * q.scales.float()[:, None]).to(dtype)


def int4_group_size(in_features: int, preferred: int = GROUP_SIZE) -> int:
    """The largest supported group size (<= preferred) that divides ``in_features``."""
    for size in (256, 128, 64, 32):
        if size <= preferred and in_features % size == 0:
            return size
    raise ValueError(f"int4 needs in_features divisible by 32, got {in_features}")


def quantize_int4(weight: torch.Tensor, group_size: int | None = None) -> Int4Weight:
    rows, cols = weight.shape
    group_size = group_size or int4_group_size(cols)
    w = weight.float().reshape(rows, cols // group_size, group_size)
    low, high = w.amin(dim=2), w.amax(dim=2)
    # Round scale and zero to bfloat16 first, then pick q against the rounded values, so the
    # stored triple reproduces the weight as well as bfloat16 scales allow.
    scales = ((high - low) / 15.0).clamp(min=1e-8).to(torch.bfloat16)
    zeros = (low + 8.0 * scales.float()).to(torch.bfloat16)
    q = torch.round((w - zeros.float()[..., None]) / scales.float()[..., None] + 8.0)
    q = q.clamp(0, 15).to(torch.uint8).reshape(rows, cols)
    return Int4Weight(nibbles=pack_nibbles(q), scales=scales, zeros=zeros, group_size=group_size)


def dequantize_int4(q: Int4Weight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    values = unpack_nibbles(q.nibbles).float()
    rows, cols = values.shape
    grouped = values.reshape(rows, cols // q.group_size, q.group_size)
    w = (grouped - 8.0) * q.scales.float()[..., None] + q.zeros.float()[..., None]
    return w.reshape(rows, cols).to(dtype)


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """``uint8 [N, K]`` values in 0..15 to ``uint8 [N, K/2]``, even columns in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)


def dequantize(q: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return dequantize_int8(q, dtype) if isinstance(q, Int8Weight) else dequantize_int4(q, dtype)


def quantize(weight: torch.Tensor, bits: int, group_size: int = GROUP_SIZE) -> QuantizedWeight:
    if bits == 8:
        return quantize_int8(weight)
    if bits == 4:
        return quantize_int4(weight, int4_group_size(weight.shape[1], group_size))
    raise ValueError(f"unsupported bit width {bits} (use 4 or 8)")


def concat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along the output dimension (e.g. gate and up into gate_up)."""
    first = parts[0]
    if isinstance(first, Int8Weight):
        return Int8Weight(torch.cat([p.values for p in parts]), torch.cat([p.scales for p in parts]))
    if any(p.group_size != first.group_size for p in parts):
        raise ValueError("cannot concatenate int4 weights with different group sizes")
    return Int4Weight(
        nibbles=torch.cat([p.nibbles for p in parts]),
        scales=torch.cat([p.scales for p in parts]),
        zeros=torch.cat([p.zeros for p in parts]),
        group_size=first.group_size,
    )


# ---------------------------------------------------------------------------------------------
# Weight memory

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
    raw = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -raw.data_ptr() % _HUGE_PAGE
    # Only whole 2 MB pages inside the tensor are advised: the tail stays in small pages, so no
    # memory past the tensor's end is ever faulted in.
    region.madvise(mmap.MADV_HUGEPAGE, start, nbytes - nbytes % _HUGE_PAGE)
    copy = raw[start : start + nbytes].view(tensor.dtype).view(tensor.shape)
    copy.copy_(tensor)
    return copy


# ---------------------------------------------------------------------------------------------
# Kernels: ours (AVX-512 VNNI), then the aten packed-weight ops, then a plain dequantize


def select_kernel(bits: int, device: torch.device) -> str:
    """``"vnni"``, ``"aten"`` or ``"reference"``: the fastest kernel for ``bits`` on ``device``."""
    if device.type != "cpu":
        return "reference"
    if cpu_quant.available():
        return "vnni"
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
        if self.kernel == "vnni":
            self.group = cpu_quant.activation_group(self.in_features)
            packed, scales, sums = cpu_quant.pack_int8(values, weight.scales, self.group)
            self.register_buffer("sums", sums)
        else:
            packed, scales = values.contiguous(), weight.scales.to(device=device, dtype=dtype)
        self.register_buffer("packed", in_huge_pages(packed))
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "vnni":
            return cpu_quant.int8_linear(x, self.packed, self.scales, self.sums, self.group)
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
        if self.kernel == "vnni":
            packed, scales, zeros = cpu_quant.pack_int4(weight.nibbles, weight.scales, weight.zeros)
            self.register_buffer("zeros", zeros)
        elif self.kernel == "aten":
            packed, scales = _pack_int4_for_aten(weight, dtype)  # scales: [K/g, N, 2] with zeros
        else:
            packed, scales = weight.nibbles.to(device), weight.scales.to(device)
            self.register_buffer("zeros", weight.zeros.to(device))
        self.register_buffer("packed", in_huge_pages(packed))
        self.register_buffer("scales", scales)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "vnni":
            return cpu_quant.int4_linear(x, self.packed, self.scales, self.zeros, self.group_size)
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
            group = cpu_quant.activation_group(weight.shape[2])
            packs = [cpu_quant.pack_int8(q.values, q.scales, group) for q in map(quantize_int8, weight)]
            setattr(self, f"{name}_group", group)
            setattr(self, f"{name}_rows", weight.shape[1])  # the kernel pads rows to whole tiles
            for i, part in enumerate(("packed", "scales", "sums")):
                self.register_buffer(f"{name}_{part}", in_huge_pages(torch.stack([p[i] for p in packs])))

    def _heads(self, name: str, x: torch.Tensor) -> torch.Tensor:
        packed, scales, sums = (getattr(self, f"{name}_{part}") for part in ("packed", "scales", "sums"))
        y = cpu_quant.ops().int8_linear_heads(x.to(self.compute_dtype), packed, scales, sums, getattr(self, f"{name}_group"))
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
        heads, tiles, blocks, _ = packed.shape
        values = packed.view(heads, tiles, blocks, TILE_ROWS, 4).permute(0, 1, 3, 2, 4).reshape(heads, tiles * TILE_ROWS, -1)
        weight = values.to(self.compute_dtype) * scales[..., None].to(self.compute_dtype)
        return weight[:, : getattr(self, f"{name}_rows")].contiguous()


TILE_ROWS = cpu_quant.TILE


def kv_b_projection(weight: torch.Tensor, empty: nn.Module, *, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The attention's kv_b_proj module for ``weight`` [N * (P + V), L], given its ``empty``
    (meta) KVBProjection: int8 for our kernels on CPU, else that module filled in ``dtype``."""
    vnni = select_kernel(8, device) == "vnni"
    halves = type(empty)(*_kv_b_dims(empty)).to(device=device, dtype=torch.float32 if vnni else dtype)
    halves.requires_grad_(False).load(weight.to(device=device, dtype=halves.w_uk_t.dtype))
    return Int8KVBProjection(halves.w_uk_t, halves.w_uv, dtype=dtype) if vnni else halves


def _kv_b_dims(module: nn.Module) -> tuple[int, int, int, int]:
    heads, latent, nope = module.w_uk_t.shape
    return heads, latent, nope, module.w_uv.shape[1]


# ---------------------------------------------------------------------------------------------
# Routed experts


class _RoutedExperts(nn.Module):
    """``forward(x [T, H], topk_ids [T, k], topk_weights [T, k]) -> [T, H]``.

    Returns ``sum_i topk_weights[t, i] * expert_{topk_ids[t, i]}(x[t])``. Only the experts
    that some token selected run; each runs once on all of its tokens.
    """

    num_experts: int

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        weights = weights.to(x.dtype)
        out = None
        for slot, index in enumerate(ids.tolist()):
            y = self.expert(index, x) * weights[slot]
            out = y if out is None else out + y
        return out

    def forward(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self.one_token(x, topk_ids[0], topk_weights[0])
        out = torch.zeros_like(x)
        flat_ids = topk_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        token_of = order // topk_ids.shape[1]
        weights = topk_weights.reshape(-1)[order].to(x.dtype)
        start = 0
        for expert_index, count in enumerate(counts):
            if count == 0:
                continue
            rows = token_of[start : start + count]
            y = self.expert(expert_index, x[rows]) * weights[start : start + count, None]
            out.index_add_(0, rows, y)
            start += count
        return out


class QuantizedExperts(_RoutedExperts):
    """The routed experts of one MoE layer with quantized weights, one module per expert."""

    def __init__(self, gate_up: list[nn.Module], down: list[nn.Module]):
        super().__init__()
        if len(gate_up) != len(down):
            raise ValueError("gate_up and down need one module per expert")
        self.gate_up = nn.ModuleList(gate_up)
        self.down = nn.ModuleList(down)
        self.num_experts = len(gate_up)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up[index](x).chunk(2, dim=-1)
        return self.down[index](F.silu(gate) * up)


class StackedInt4Experts(_RoutedExperts):
    """int4 routed experts stacked per layer for our VNNI kernels.

    A decoded token runs through all of its experts in one kernel call (one activation
    quantization, one parallel pass over every selected expert's tiles).
    """

    def __init__(self, gate_up: list[Int4Weight], down: list[Int4Weight], *, dtype: torch.dtype):
        super().__init__()
        self.num_experts = len(gate_up)
        self.compute_dtype = dtype
        self.hidden_size = gate_up[0].shape[1]
        self.up_group, self.down_group = gate_up[0].group_size, down[0].group_size
        for prefix, weights in (("up", gate_up), ("down", down)):
            packs = [cpu_quant.pack_int4(w.nibbles, w.scales, w.zeros) for w in weights]
            for i, part in enumerate(("packed", "scales", "zeros")):
                self.register_buffer(f"{prefix}_{part}", in_huge_pages(torch.stack([p[i] for p in packs])))

    def _linear(self, prefix: str, index: int, x: torch.Tensor, group: int) -> torch.Tensor:
        packed, scales, zeros = (getattr(self, f"{prefix}_{part}")[index] for part in ("packed", "scales", "zeros"))
        return cpu_quant.int4_linear(x, packed, scales, zeros, group)

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self._linear("up", index, x.to(self.compute_dtype), self.up_group).chunk(2, dim=-1)
        return self._linear("down", index, F.silu(gate) * up, self.down_group)[:, : self.hidden_size].to(x.dtype)

    def one_token(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = cpu_quant.ops().int4_moe_token(
            x.to(self.compute_dtype), ids, weights, self.up_packed, self.up_scales, self.up_zeros, self.up_group,
            self.down_packed, self.down_scales, self.down_zeros, self.down_group,
        )
        return y[:, : self.hidden_size].to(x.dtype)


def quantized_experts(
    gate_up: list[QuantizedWeight], down: list[QuantizedWeight], *, dtype: torch.dtype, device: torch.device | str = "cpu"
) -> _RoutedExperts:
    """One layer's routed experts in the fastest form this machine runs them in."""
    device = torch.device(device)
    stackable = all(isinstance(w, Int4Weight) for w in gate_up + down) and select_kernel(4, device) == "vnni"
    if stackable and len({w.group_size for w in gate_up}) == 1 and len({w.group_size for w in down}) == 1:
        return StackedInt4Experts(gate_up, down, dtype=dtype)
    return QuantizedExperts(
        [quantized_linear(w, dtype=dtype, device=device) for w in gate_up],
        [quantized_linear(w, dtype=dtype, device=device) for w in down],
    )


# ---------------------------------------------------------------------------------------------
# int8 latent KV cache


def quantize_latent(latent: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize cached MLA latents ``[..., D]`` to int8 with two scales per token.

    The first ``split`` values (the normalized latent ``c_kv``) and the rest (the roped key
    ``k_pe``, not normalized) have different ranges, so each part gets its own symmetric scale.
    Returns ``(values int8 [..., D], scales float32 [..., 2])``.
    """
    parts = (latent[..., :split].float(), latent[..., split:].float())
    scales = torch.stack([p.abs().amax(dim=-1).clamp(min=1e-12) / 127.0 for p in parts], dim=-1)
    values = torch.cat(
        [torch.round(p / scales[..., i : i + 1]).clamp(-127, 127) for i, p in enumerate(parts)], dim=-1
    )
    return values.to(torch.int8), scales


def dequantize_latent(
    values: torch.Tensor, scales: torch.Tensor, split: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    latent = values[..., :split].to(dtype) * scales[..., 0:1].to(dtype)
    rope = values[..., split:].to(dtype) * scales[..., 1:2].to(dtype)
    return torch.cat([latent, rope], dim=-1)


class Int8LatentCache:
    """One layer's latent cache in int8 (two scales per token); reads come back dequantized.

    Stands in for the engine's ``[slots, 576]`` tensor: attention writes with ``index_copy_``
    and reads slices piece by piece, so only one piece is ever widened at a time. About half
    the memory of a bfloat16 cache, for contexts that would not fit otherwise.
    """

    def __init__(self, slots: int, dim: int, split: int, dtype: torch.dtype, device: torch.device | str = "cpu"):
        self.values = torch.zeros(slots, dim, dtype=torch.int8, device=device)
        self.scales = torch.zeros(slots, 2, dtype=torch.float32, device=device)
        self.split, self.dtype = split, dtype

    @property
    def device(self) -> torch.device:
        return self.values.device

    @property
    def shape(self) -> torch.Size:
        return self.values.shape

    def index_copy_(self, dim: int, index: torch.Tensor, latents: torch.Tensor) -> "Int8LatentCache":
        values, scales = quantize_latent(latents, self.split)
        self.values.index_copy_(dim, index, values)
        self.scales.index_copy_(dim, index, scales)
        return self

    def __getitem__(self, rows: slice) -> torch.Tensor:
        return dequantize_latent(self.values[rows], self.scales[rows], self.split, self.dtype)

    @staticmethod
    def bytes_per_token(dim: int) -> int:
        return dim + 2 * 4
