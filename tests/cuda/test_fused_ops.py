"""Triton RMSNorm, rope and SiLU*mul against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine import ops
from glmcode.engine.model.layers import Rotary

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dim", [64, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(triton_fused, device, dim, dtype):
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(2, 3, dim, generator=gen) * 3).to(device=device, dtype=dtype)
    weight = torch.randn(dim, generator=gen).to(device=device, dtype=dtype)
    got = triton_fused.rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, ops.rms_norm.reference(x, weight, 1e-5), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_returns_norm_and_sum(triton_fused, device, dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(2, 4, 96, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(device=device, dtype=dtype)
    normed, summed = triton_fused.add_rms_norm(x, residual, weight, 1e-6)
    want_normed, want_summed = ops.add_rms_norm.reference(x, residual, weight, 1e-6)
    # exact in fp32; bf16 may differ by one ulp (the interpreter truncates fp32 -> bf16)
    sum_tolerance = 0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(summed, want_summed, atol=sum_tolerance, rtol=sum_tolerance)
    torch.testing.assert_close(normed, want_normed, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_strided_views(triton_fused, device, dtype):
    """q_pe and k_pe as the views the model has: the tail of each head and of the kv_a output."""
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, nope, rope = 5, 3, 8, 16
    q = torch.randn(num_tokens, num_heads, nope + rope, generator=gen).to(device=device, dtype=dtype)
    kv_a = torch.randn(num_tokens, 32 + rope, generator=gen).to(device=device, dtype=dtype)
    positions = torch.tensor([0, 1, 7, 300, 4095], device=device)
    cos_sin = Rotary(rope, 1e6, 4096).cos_sin(torch.device(device))
    want_q, want_kv_a = q.clone(), kv_a.clone()

    triton_fused.rope_(q[..., nope:], kv_a[:, 32:], positions, cos_sin)
    ops.rope_.reference(want_q[..., nope:], want_kv_a[:, 32:], positions, cos_sin)

    tol = TOLERANCE[dtype]
    torch.testing.assert_close(q, want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(kv_a, want_kv_a, atol=tol, rtol=tol)


@pytest.mark.parametrize("inter", [48, 1536])
def test_silu_mul(triton_fused, device, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(3, 2 * inter, generator=gen).to(device=device, dtype=torch.bfloat16)
    got = triton_fused.silu_mul(gate_up)
    assert got.shape == (3, inter)
    torch.testing.assert_close(got, ops.silu_mul.reference(gate_up), atol=2e-2, rtol=2e-2)
