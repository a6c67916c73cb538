"""Sampling parameters and the per-request sampler (greedy, temperature, top-k, top-p, min-p)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from glmcode.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one request.

    temperature=0 is greedy. top_k=0, top_p=1 and min_p=0 disable those filters.
    stop_token_ids=None stops on the model's own end-of-turn tokens; a list replaces them;
    [] never stops early. The stop token itself is not part of the output.
    """

    max_tokens: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: list[int] | None = None

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise UsageError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UsageError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise UsageError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise UsageError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise UsageError(f"min_p must be in [0, 1), got {self.min_p}")


class Sampler:
    """Picks the next token of one request; owns the request's random generator."""

    def __init__(self, params: SamplingParams, num_real_tokens: int):
        self.params = params
        self.num_real_tokens = num_real_tokens  # logits past this are vocabulary padding
        self.generator = torch.Generator()
        if params.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(params.seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """logits: float32 [vocab] for one position."""
        logits = logits[: self.num_real_tokens].float().cpu()
        p = self.params
        if p.temperature == 0:
            return int(torch.argmax(logits))
        logits = logits / p.temperature
        if 0 < p.top_k < logits.shape[0]:
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, -1)
        if p.top_p < 1:
            probs = _top_p(probs, p.top_p)
        if p.min_p > 0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0)
        return int(torch.multinomial(probs, 1, generator=self.generator))


def _top_p(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p."""
    sorted_probs, order = torch.sort(probs, descending=True)
    mass_before = torch.cumsum(sorted_probs, 0) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0)
    return torch.zeros_like(probs).scatter_(0, order, sorted_probs)
