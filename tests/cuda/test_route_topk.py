"""Sigmoid top-k routing (router logits -> expert ids and weights): the engine Router against the
reference implementation's, and the Triton kernel against ops.route_topk."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine import ops
from glmcode.engine.model.moe import Router


def config_for(num_experts: int, top_k: int, normalize: bool, groups: tuple[int, int] = (1, 1)) -> ModelConfig:
    return ModelConfig.from_dict({
        "model_type": "glm4_moe_lite", "vocab_size": 8, "hidden_size": 32, "intermediate_size": 8,
        "moe_intermediate_size": 8, "num_hidden_layers": 2, "num_attention_heads": 2, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 16, "v_head_dim": 8, "n_routed_experts": num_experts,
        "num_experts_per_tok": top_k, "max_position_embeddings": 64, "rope_theta": 1e4,
        "routed_scaling_factor": 1.8, "norm_topk_prob": normalize, "n_group": groups[0], "topk_group": groups[1],
    })  # fmt: skip


def router_for(num_experts: int, top_k: int, normalize: bool, gen: torch.Generator, groups=(1, 1)) -> Router:
    router = Router(config_for(num_experts, top_k, normalize, groups))
    router.weight.data = torch.randn(num_experts, 32, generator=gen)
    router.e_score_correction_bias = torch.randn(num_experts, generator=gen) * 0.3
    return router


def sorted_by_expert(ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot order is free (the MoE sums over slots): compare per token sorted by expert id."""
    order = ids.long().argsort(-1)
    return ids.long().gather(1, order), weights.float().gather(1, order)


@pytest.mark.parametrize("groups", [(1, 1), (3, 2)])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_engine_router_picks_what_the_reference_router_picks(normalize, groups):
    modeling = pytest.importorskip("transformers.models.glm4_moe_lite.modeling_glm4_moe_lite")
    transformers_config = pytest.importorskip("transformers").Glm4MoeLiteConfig
    gen = torch.Generator().manual_seed(0)
    router = router_for(12, 3, normalize, gen, groups)
    reference = modeling.Glm4MoeLiteTopkRouter(transformers_config(
        hidden_size=32, n_routed_experts=12, num_experts_per_tok=3, n_group=groups[0], topk_group=groups[1],
        routed_scaling_factor=1.8, norm_topk_prob=normalize))  # fmt: skip
    reference.weight.data.copy_(router.weight.data)
    reference.e_score_correction_bias.copy_(router.e_score_correction_bias)
    x = torch.randn(7, 32, generator=gen)
    _, want_weights, want_ids = reference(x)
    for shared in (None, 12):
        got = router(x, shared_expert_id=shared)
        want = (want_ids, want_weights) if shared is None else ops.with_shared_expert(want_ids, want_weights, shared)
        assert got[0].dtype == torch.int32 and got[0].shape == (7, 3 + (shared is not None))
        got, want = sorted_by_expert(*got), sorted_by_expert(*want)
        assert torch.equal(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])


@pytest.mark.parametrize(("num_experts", "top_k", "shared"), [(64, 4, 64), (12, 3, None), (6, 1, 6), (100, 8, None)])
@pytest.mark.parametrize("normalize", [True, False])
def test_triton_matches_reference(triton_fused, device, num_experts, top_k, shared, normalize):
    gen = torch.Generator().manual_seed(num_experts + top_k)
    logits = torch.randn(9, num_experts, generator=gen).to(device)
    bias = (torch.randn(num_experts, generator=gen) * 0.3).to(device)
    got = triton_fused.route_topk(logits, bias, top_k, 1.8, normalize, shared)
    want = ops.route_topk.reference(logits, bias, top_k, 1.8, normalize, shared)
    assert got[0].dtype == torch.int32 and got[0].shape == want[0].shape
    got, want = sorted_by_expert(*got), sorted_by_expert(*want)
    assert torch.equal(got[0].cpu(), want[0].cpu())
    torch.testing.assert_close(got[1].cpu(), want[1].cpu(), atol=1e-6, rtol=1e-5)
