"""The mixture-of-experts feed-forward block: sigmoid router, routed experts, shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine import ops
from glmcode.engine.config import ModelConfig
from glmcode.engine.model.layers import GatedMLP


class Router(nn.Module):
    """Top-k expert choice in float32 (ops.route_topk).

    Scores are sigmoid(logits). The correction bias only steers which experts are picked; the
    weights are the unbiased scores of the picked experts, renormalized, times the routed
    scaling factor.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.normalize = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.empty(config.n_routed_experts))

    def forward(self, x: torch.Tensor, shared_expert_id: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (expert ids [T, k] int32, weights [T, k] float32); with
        shared_expert_id, one more always-picked slot of weight 1."""
        logits = F.linear(x.float(), self.weight.float())
        if self.n_group == 1:
            return ops.route_topk(logits, self.e_score_correction_bias, self.top_k, self.scaling, self.normalize, shared_expert_id)
        scores = logits.sigmoid()
        choice = self._keep_best_groups(scores + self.e_score_correction_bias)
        expert_ids = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        expert_ids, weights = expert_ids.to(torch.int32), weights * self.scaling
        if shared_expert_id is not None:
            expert_ids, weights = ops.with_shared_expert(expert_ids, weights, shared_expert_id)
        return expert_ids, weights

    def _keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: only experts in the topk_group best groups stay eligible."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


class RoutedExperts(nn.Module):
    """All routed experts of one layer, stacked: gate_up [E, 2I, H] and down [E, H, I].

    Only the experts a token picked are computed (ops.fused_moe). A quantized variant replaces
    this module whole, keeping `forward(x, expert_ids, weights)`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        experts, hidden, width = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return ops.fused_moe(x, self.gate_up_proj, self.down_proj, expert_ids, weights)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
        self.shared_expert_id: int | None = None  # set by fold_shared_expert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        expert_ids, weights = self.gate(x, self.shared_expert_id)
        out = self.experts(x, expert_ids, weights)
        return out if self.shared_expert_id is not None else out + self.shared_experts(x)

    def fold_shared_expert(self) -> bool:
        """Make the shared expert the last of the stacked routed experts, picked by every token,
        so one fused MoE call runs it too (the GPU path does this once at load; the modules
        keep views of the new stacks, so nothing is held twice). False when it cannot be folded:
        quantized experts, or a shared expert wider than a routed one (n_shared_experts > 1)."""
        experts, shared = self.experts, self.shared_experts
        if type(experts) is not RoutedExperts or shared.width != experts.down_proj.shape[2]:
            return False
        self.shared_expert_id = experts.gate_up_proj.shape[0]
        for name, shared_linear in (("gate_up_proj", shared.gate_up_proj), ("down_proj", shared.down_proj)):
            stacked = torch.cat([getattr(experts, name), shared_linear.weight[None]])
            setattr(experts, name, nn.Parameter(stacked, requires_grad=False))
            shared_linear.weight = nn.Parameter(stacked[-1], requires_grad=False)
        return True
