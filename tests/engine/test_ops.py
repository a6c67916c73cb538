"""The ops' PyTorch bodies (the CPU path and the kernels' oracle) against the model math itself."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine import ops
from glmcode.engine.cuda.moe import grouped_mm_available, grouped_moe
from glmcode.engine.model.layers import Rotary
from glmcode.engine.quant.latent_cache import quantize_fp8_per_token


def test_absorbed_decode_equals_expanded_attention():
    """model-spec 2.2 (expanded K/V per head) == 2.3 (W_UK folded into q, W_UV after), paged."""
    gen = torch.Generator().manual_seed(0)
    heads, nope, rope, latent, value, context, block_size = 3, 6, 4, 10, 5, 11, 4
    kv_b = torch.randn(heads * (nope + value), latent, generator=gen, dtype=torch.float64)
    c_kv = torch.randn(context, latent, generator=gen, dtype=torch.float64)
    k_pe = torch.randn(context, rope, generator=gen, dtype=torch.float64)
    q_nope = torch.randn(heads, nope, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(heads, rope, generator=gen, dtype=torch.float64)
    scale = (nope + rope) ** -0.5

    kv = (c_kv @ kv_b.T).view(context, heads, nope + value)
    keys = torch.cat([kv[..., :nope], k_pe[:, None, :].expand(context, heads, rope)], dim=-1)
    query = torch.cat([q_nope, q_pe], dim=-1)
    probs = torch.softmax(torch.einsum("nd,snd->ns", query, keys) * scale, dim=-1)
    expanded = torch.einsum("ns,snv->nv", probs, kv[..., nope:])

    per_head = kv_b.view(heads, nope + value, latent)
    w_uk, w_uv = per_head[:, :nope], per_head[:, nope:]  # [N, P, L], [N, V, L]
    pages = torch.tensor([2, 0, 5], dtype=torch.int32)  # three pages of four, out of order
    cache = torch.zeros(6, block_size, latent + rope, dtype=torch.float64)
    rows = torch.cat([c_kv, k_pe], dim=-1)
    for position in range(context):
        cache[pages[position // block_size], position % block_size] = rows[position]
    q_latent = torch.einsum("np,npl->nl", q_nope, w_uk)  # W_UK folded into the query
    out_latent = ops.mla_decode(
        q_latent[None].float(), q_pe[None].float(), cache.float(), pages[None], torch.tensor([context], dtype=torch.int32), scale
    )[0]
    absorbed = torch.einsum("nl,nvl->nv", out_latent.double(), w_uv)  # W_UV applied after
    torch.testing.assert_close(absorbed, expanded, atol=1e-4, rtol=1e-4)


def naive_moe(x, w13, w2, ids, weights):
    out = torch.zeros_like(x, dtype=torch.float64)
    for token in range(x.shape[0]):
        for expert, weight in zip(ids[token].tolist(), weights[token].tolist()):
            gate, up = (w13[expert].double() @ x[token].double()).chunk(2)
            out[token] += weight * (w2[expert].double() @ (torch.nn.functional.silu(gate) * up))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_and_its_grouped_gpu_form_match_the_formula(dtype):
    gen = torch.Generator().manual_seed(1)
    tokens, experts, top_k, hidden, inter = 7, 5, 2, 32, 16
    x = torch.randn(tokens, hidden, generator=gen).to(dtype)
    w13 = (torch.randn(experts, 2 * inter, hidden, generator=gen) / 6).to(dtype)
    w2 = (torch.randn(experts, hidden, inter, generator=gen) / 4).to(dtype)
    ids = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=gen)
    want = naive_moe(x, w13, w2, ids, weights)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ops.fused_moe(x, w13, w2, ids, weights).double(), want, atol=tol, rtol=tol)
    if grouped_mm_available(x.device):
        torch.testing.assert_close(grouped_moe(x, w13, w2, ids, weights).double(), want, atol=tol, rtol=tol)


def rope_table(positions: int, rope_dim: int, theta: float) -> torch.Tensor:
    return Rotary(rope_dim, theta, positions).cos_sin(torch.device("cpu"))


def test_rope_dot_products_depend_on_relative_position_only():
    gen = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 2, 64, generator=gen), torch.randn(1, 64, generator=gen)
    table = rope_table(64, 64, 1e6)

    def score(q_pos, k_pos):
        q_rot, k_rot = q.clone(), k.clone()
        ops.rope_(q_rot, torch.zeros(1, 64), torch.tensor([q_pos]), table)
        ops.rope_(torch.zeros(1, 1, 64), k_rot, torch.tensor([k_pos]), table)
        return q_rot[0] @ k_rot[0]

    torch.testing.assert_close(score(9, 4), score(25, 20), atol=1e-4, rtol=1e-4)
    assert not torch.allclose(score(9, 4), score(9, 5))
    # the pair (x0, x1) at position 1 turns by exactly one radian (inv_freq[0] = 1); the rotated
    # pair lands de-interleaved, at dims 0 and 32
    x = torch.tensor([[1.0, 0.0] * 32])
    ops.rope_(torch.zeros(1, 1, 64), x, torch.tensor([1]), table)
    one = torch.tensor(1.0)
    torch.testing.assert_close(torch.stack([x[0, 0], x[0, 32]]), torch.stack([one.cos(), one.sin()]))


def test_fp8_per_token_round_trip_is_within_the_format_precision():
    rows = torch.randn(50, 576) * torch.logspace(-2, 2, 50)[:, None]
    quantized, scales = quantize_fp8_per_token(rows)
    assert quantized.dtype == torch.float8_e4m3fn
    restored = quantized.float() * scales[:, None]
    relative = (restored - rows).abs() / rows.abs().amax(dim=-1, keepdim=True)
    assert relative.max() < 2**-4  # e4m3: 3 mantissa bits


def test_ops_run_their_pytorch_bodies_on_cpu():
    gen = torch.Generator().manual_seed(3)
    gate_up = torch.randn(2, 8, generator=gen)
    assert not ops.uses_triton(gate_up)
    torch.testing.assert_close(ops.silu_mul(gate_up), ops.silu_mul.reference(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_mul(gate_up), torch.nn.functional.silu(gate) * up)
