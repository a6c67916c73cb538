"""Sigmoid top-k routing (router logits -> expert ids and weights): Triton, reference, engine Router."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.cuda.reference import route_topk_reference, with_shared_expert
from glmcode.engine.model.moe import Router


def router_for(num_experts: int, top_k: int, normalize: bool, gen: torch.Generator) -> Router:
    config = ModelConfig.from_dict({
        "model_type": "glm4_moe_lite", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8,
        "moe_intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 16, "v_head_dim": 8, "n_routed_experts": num_experts,
        "num_experts_per_tok": top_k, "max_position_embeddings": 64, "rope_theta": 1e4,
        "routed_scaling_factor": 1.8, "norm_topk_prob": normalize,
    })  # fmt: skip
    router = Router(config)
    router.weight.data = torch.randn(num_experts, 32, generator=gen)
    router.e_score_correction_bias = torch.randn(num_experts, generator=gen) * 0.3
    return router


def sorted_by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot order is free (the MoE sums over slots): compare per token sorted by expert id."""
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


@pytest.mark.parametrize("normalize", [True, False])
def test_reference_is_the_engine_router_plus_the_shared_slot(normalize):
    gen = torch.Generator().manual_seed(0)
    router = router_for(12, 3, normalize, gen)
    x = torch.randn(7, 32, generator=gen)
    want_weights, want_ids = router(x)
    want = sorted_by_expert(*with_shared_expert(want_ids, want_weights, 12))
    logits = x @ router.weight.T
    got = route_topk_reference(logits, router.e_score_correction_bias, 3, 1.8, normalize, shared_expert_id=12)
    assert got[0].dtype == torch.int32 and got[0].shape == (7, 4)
    got = sorted_by_expert(*got)
    assert torch.equal(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize(("num_experts", "top_k", "shared"), [(64, 4, 64), (12, 3, None), (6, 1, 6), (100, 8, None)])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_matches_reference(triton_fused, device, num_experts, top_k, shared, normalize):
    gen = torch.Generator().manual_seed(num_experts + top_k)
    logits = torch.randn(9, num_experts, generator=gen).to(device)
    bias = (torch.randn(num_experts, generator=gen) * 0.3).to(device)
    got = triton_fused.route_topk(logits, bias, top_k, 1.8, normalize, shared)
    want = route_topk_reference(logits, bias, top_k, 1.8, normalize, shared)
    assert got[0].dtype == torch.int32 and got[0].shape == want[0].shape
    got, want = sorted_by_expert(*got), sorted_by_expert(*want)
    assert torch.equal(got[0].cpu(), want[0].cpu())
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=1e-6, rtol=1e-5)
