"""The portable weight formats of glmcode's int8 / int4 weight-only quantization.

Both are stored in a packing-independent form, so a checkpoint written once runs on any machine:

- int8, per output channel, symmetric: ``w[n, k] = values[n, k] * scales[n]``.
- int4, per group of ``group_size`` inputs, asymmetric:
  ``w[n, k] = (q[n, k] - 8) * scales[n, g] + zeros[n, g]`` with ``g = k // group_size`` and
  ``q`` in 0..15, packed two per byte (even ``k`` in the low nibble).
  The ``(q - 8) * s + z`` convention is the one ``aten._weight_int4pack_mm_for_cpu`` uses, so
  the portable form maps onto it without any rescaling.

``QuantScheme`` says which checkpoint tensors get which width. The modules that run these
weights are in ``linear.py`` and ``experts.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmcode import options
from glmcode.engine.weights.names import weight_role

GROUP_SIZE = 128


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
            options.INT4: cls(expert_bits=4, linear_bits=8),
            options.INT4_ALL: cls(expert_bits=4, linear_bits=4),
            options.INT8: cls(expert_bits=8, linear_bits=8),
        }
        if name not in schemes:
            raise ValueError(f"unknown quantization {name!r}; use one of {', '.join(options.QUANTIZATIONS)}")
        return schemes[name]

    def bits_for(self, name: str, shape: tuple[int, ...]) -> int | None:
        """The bit width for checkpoint tensor ``name``, or None to keep it unquantized."""
        role = weight_role(name) if len(shape) == 2 else None
        if role is None:
            return None
        if role == "kv_b_proj":
            # Decode reads it as int8 per head in any scheme (Int8KVBProjection): int4 in the
            # checkpoint would only lose precision.
            return 8
        bits = self.expert_bits if role == "expert" else self.linear_bits
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
