"""Triton fused MoE (align, gate/up, down) against the PyTorch references."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine import ops
from glmcode.engine.cuda.moe import moe_align_reference


def routing(num_tokens, num_experts, top_k, gen):
    """Distinct experts per token (as top-k gives) with random positive weights."""
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:top_k] for _ in range(num_tokens)])
    return ids.to(torch.int32), torch.rand(num_tokens, top_k, generator=gen) + 0.1


def moe_case(device, *, num_tokens, num_experts, top_k, hidden, inter, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, hidden, generator=gen)
    w13 = torch.randn(num_experts, 2 * inter, hidden, generator=gen) / hidden**0.5
    w2 = torch.randn(num_experts, hidden, inter, generator=gen) / inter**0.5
    ids, weights = routing(num_tokens, num_experts, top_k, gen)
    to = dict(device=device)
    return x.to(dtype=dtype, **to), w13.to(dtype=dtype, **to), w2.to(dtype=dtype, **to), ids.to(**to), weights.to(**to)


@pytest.mark.parametrize(
    ("num_tokens", "num_experts", "top_k", "block_m"),
    [(1, 8, 2, 16), (5, 8, 3, 16), (37, 65, 5, 16), (64, 64, 4, 64), (200, 7, 4, 16)],
)
def test_align_matches_reference_exactly(triton_moe, device, num_tokens, num_experts, top_k, block_m):
    ids, _ = routing(num_tokens, num_experts, top_k, torch.Generator().manual_seed(num_tokens))
    ids = ids.to(device)
    got_pairs, got_experts = triton_moe.moe_align(ids, num_experts, block_m)
    want_pairs, want_experts = moe_align_reference(ids, num_experts, block_m)
    assert torch.equal(got_pairs.cpu(), want_pairs.cpu())
    assert torch.equal(got_experts.cpu(), want_experts.cpu())


def test_align_reference_groups_every_pair_once():
    ids = torch.tensor([[3, 0], [0, 2], [3, 1], [0, 3]])
    sorted_pairs, block_expert = moe_align_reference(ids, num_experts=5, block_m=2)
    sentinel = ids.numel()
    # expert 0: pairs 1, 2, 6 (3 rows -> 2 blocks); 1: pair 5; 2: pair 3; 3: pairs 0, 4, 7
    assert sorted_pairs.tolist() == [1, 2, 6, sentinel, 5, sentinel, 3, sentinel, 0, 4, 7, sentinel]
    assert block_expert.tolist() == [0, 0, 1, 2, 3, 3]
    # with fewer used experts the static bound leaves spare blocks, marked -1
    _, spare = moe_align_reference(torch.tensor([[1], [1], [1]]), num_experts=5, block_m=2)
    assert spare.tolist() == [1, 1, -1]


TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize(("num_tokens", "top_k"), [(1, 2), (4, 3), (9, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_matches_reference(triton_moe, device, num_tokens, top_k, dtype):
    x, w13, w2, ids, weights = moe_case(
        device, num_tokens=num_tokens, num_experts=6, top_k=top_k, hidden=64, inter=48, dtype=dtype,
    )
    got = triton_moe.fused_moe(x, w13, w2, ids, weights, block_n=32, block_k=32)
    want = ops.fused_moe.reference(x, w13, w2, ids, weights)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.float(), want.float(), atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype])


def test_bigger_row_blocks_and_int64_ids(triton_moe, device):
    x, w13, w2, ids, weights = moe_case(
        device, num_tokens=70, num_experts=5, top_k=2, hidden=32, inter=16, dtype=torch.float32, seed=1,
    )
    got = triton_moe.fused_moe(x, w13, w2, ids.long(), weights, block_m=64, block_n=16, block_k=16)
    torch.testing.assert_close(got, ops.fused_moe.reference(x, w13, w2, ids, weights), atol=1e-5, rtol=1e-5)


def test_shared_expert_folded_in_as_an_extra_expert(triton_moe, device):
    """Routed experts plus the shared one as expert E with weight 1 == routed MoE + shared MLP."""
    x, w13, w2, ids, weights = moe_case(
        device, num_tokens=3, num_experts=4, top_k=2, hidden=32, inter=16, dtype=torch.float32, seed=2,
    )
    shared_w13, shared_w2 = w13[0].clone() * 0.5, w2[0].clone() * 2.0
    stacked_w13, stacked_w2 = torch.cat([w13, shared_w13[None]]), torch.cat([w2, shared_w2[None]])
    all_ids, all_weights = ops.with_shared_expert(ids, weights, shared_expert_id=4)

    got = triton_moe.fused_moe(x, stacked_w13, stacked_w2, all_ids, all_weights, block_n=16, block_k=16)
    shared = ops.silu_mul.reference(x @ shared_w13.T) @ shared_w2.T
    want = ops.fused_moe.reference(x, w13, w2, ids, weights) + shared
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_real_glm_expert_shapes(triton_moe, device):
    """hidden 2048, width 1536; two experts and large tiles keep the interpreter quick."""
    x, w13, w2, ids, weights = moe_case(
        device, num_tokens=1, num_experts=2, top_k=1, hidden=2048, inter=1536, dtype=torch.bfloat16, seed=3,
    )
    got = triton_moe.fused_moe(x, w13, w2, ids, weights, block_n=256, block_k=256)
    want = ops.fused_moe.reference(x, w13, w2, ids, weights)
    torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
