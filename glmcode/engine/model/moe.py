"""The mixture-of-experts feed-forward block: sigmoid router, routed experts, shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from glmcode.engine.config import ModelConfig
from glmcode.engine.model.layers import GatedMLP, linear_forward, silu_and_mul


class Router(nn.Module):
    """Top-k expert choice in float32.

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

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, hidden] -> (weights [T, k] float32, expert ids [T, k])."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()
        choice = scores + self.e_score_correction_bias
        if self.n_group > 1:
            choice = self._keep_best_groups(choice)
        expert_ids = torch.topk(choice, self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, expert_ids)
        if self.normalize:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, expert_ids

    def _keep_best_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: only experts in the topk_group best groups stay eligible."""
        grouped = choice.view(choice.shape[0], self.n_group, -1)
        group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        best = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
        return grouped.masked_fill(~keep[..., None], float("-inf")).view_as(choice)


class RoutedExperts(nn.Module):
    """All routed experts of one layer, stacked: gate_up [E, 2I, H] and down [E, H, I].

    Only the experts a token picked are computed. A quantized variant replaces this module
    whole, keeping `forward(x, expert_ids, weights)`.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        experts, hidden, width = config.n_routed_experts, config.hidden_size, config.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * width, hidden))
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, width))

    def expert(self, index: int, x: torch.Tensor) -> torch.Tensor:
        hidden = silu_and_mul(linear_forward(x, self.gate_up_proj[index]))
        return linear_forward(hidden, self.down_proj[index])

    def forward(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1:
            return self._one_token(x, expert_ids[0], weights[0])
        return self._grouped_by_expert(x, expert_ids, weights)

    def _one_token(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = None
        for index, weight in zip(expert_ids.tolist(), weights.unbind()):
            y = (self.expert(index, x).float() * weight).to(x.dtype)
            out = y if out is None else out + y
        return out

    def _grouped_by_expert(self, x: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()
        order = torch.argsort(flat_ids, stable=True)
        counts = torch.bincount(flat_ids, minlength=self.gate_up_proj.shape[0]).tolist()
        token_of = order // top_k
        sorted_weights = weights.flatten()[order]
        out = torch.zeros_like(x)
        start = 0
        for index, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of[start : start + count]
            y = self.expert(index, x[tokens]).float() * sorted_weights[start : start + count, None]
            out.index_add_(0, tokens, y.to(x.dtype))
            start += count
        return out


class MoE(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.gate = Router(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = GatedMLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, expert_ids = self.gate(x)
        return self.experts(x, expert_ids, weights) + self.shared_experts(x)
