"""Triton RMSNorm, rope and SiLU*mul against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.cuda.reference import (
    add_rms_norm_reference,
    rms_norm_reference,
    rope_cos_sin,
    rope_interleaved_reference,
    silu_mul_reference,
)

TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dim", [64, 768])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm(triton_fused, device, dim, dtype):
    gen = torch.Generator().manual_seed(dim)
    x = (torch.randn(2, 3, dim, generator=gen) * 3).to(device=device, dtype=dtype)
    weight = torch.randn(dim, generator=gen).to(device=device, dtype=dtype)
    got = triton_fused.rms_norm(x, weight, 1e-5)
    assert got.shape == x.shape and got.dtype == dtype
    torch.testing.assert_close(got, rms_norm_reference(x, weight, 1e-5), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_returns_norm_and_sum(triton_fused, device, dtype):
    gen = torch.Generator().manual_seed(1)
    x, residual = (torch.randn(2, 4, 96, generator=gen).to(device=device, dtype=dtype) for _ in range(2))
    weight = torch.randn(96, generator=gen).to(device=device, dtype=dtype)
    normed, summed = triton_fused.add_rms_norm(x, residual, weight, 1e-6)
    want_normed, want_summed = add_rms_norm_reference(x, residual, weight, 1e-6)
    # exact in fp32; bf16 may differ by one ulp (the interpreter truncates fp32 -> bf16)
    sum_tolerance = 0 if dtype == torch.float32 else 2**-7
    torch.testing.assert_close(summed, want_summed, atol=sum_tolerance, rtol=sum_tolerance)
    torch.testing.assert_close(normed, want_normed, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


@pytest.mark.parametrize("deinterleave", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_place_on_strided_views(triton_fused, device, deinterleave, dtype):
    """q_pe and k_pe as the views the model has: the tail of each head and of the kv_a output."""
    gen = torch.Generator().manual_seed(2)
    num_tokens, num_heads, nope, rope = 5, 3, 8, 16
    q = torch.randn(num_tokens, num_heads, nope + rope, generator=gen).to(device=device, dtype=dtype)
    kv_a = torch.randn(num_tokens, 32 + rope, generator=gen).to(device=device, dtype=dtype)
    positions = torch.tensor([0, 1, 7, 300, 4095], device=device)
    cos_sin = rope_cos_sin(4096, rope, 1e6, device=device)
    q_before, kv_a_before = q.clone(), kv_a.clone()

    triton_fused.rope_interleaved_(q[..., nope:], kv_a[:, 32:], positions, cos_sin, deinterleave)

    tol = TOLERANCE[dtype]
    want_q = rope_interleaved_reference(q_before[..., nope:], positions, cos_sin, deinterleave)
    want_k = rope_interleaved_reference(kv_a_before[:, 32:], positions, cos_sin, deinterleave)
    torch.testing.assert_close(q[..., nope:], want_q, atol=tol, rtol=tol)
    torch.testing.assert_close(kv_a[:, 32:], want_k, atol=tol, rtol=tol)
    assert torch.equal(q[..., :nope], q_before[..., :nope]) and torch.equal(kv_a[:, :32], kv_a_before[:, :32])


@pytest.mark.parametrize("inter", [48, 1536])
def test_silu_mul(triton_fused, device, inter):
    gen = torch.Generator().manual_seed(inter)
    gate_up = torch.randn(3, 2 * inter, generator=gen).to(device=device, dtype=torch.bfloat16)
    got = triton_fused.silu_mul(gate_up)
    assert got.shape == (3, inter)
    torch.testing.assert_close(got, silu_mul_reference(gate_up), atol=2e-2, rtol=2e-2)
