"""The sampler's filters, on hand-made logits."""

from __future__ import annotations

from dataclasses import replace

import torch

from glmcode.engine.sampler import Sampler, SamplingParams

LOGITS = torch.tensor([1.0, 3.0, 2.5, 0.5, -1.0, 9.0])  # the last id is vocabulary padding


def draws(params: SamplingParams, n: int = 1000) -> set[int]:
    sampler = Sampler(replace(params, seed=0), num_real_tokens=5)
    return {sampler(LOGITS) for _ in range(n)}


def test_greedy_takes_the_best_real_token():
    assert draws(SamplingParams(temperature=0), 3) == {1}


def test_padding_is_never_sampled_even_when_it_dominates():
    assert 5 not in draws(SamplingParams(temperature=5.0))


def test_top_k_top_p_and_min_p_restrict_the_candidates():
    assert draws(SamplingParams(temperature=1.0, top_k=2)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_k=1)) == {1}
    # softmax over real ids: p(1)=.53, p(2)=.32, p(0)=.07, ... -> top_p .8 keeps {1, 2}
    assert draws(SamplingParams(temperature=1.0, top_p=0.8)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, min_p=0.5)) == {1, 2}
    assert draws(SamplingParams(temperature=1.0, min_p=0.65)) == {1}
    assert draws(SamplingParams(temperature=1.0)) == {0, 1, 2, 3, 4}


def test_a_seed_fixes_the_draws():
    first = Sampler(SamplingParams(temperature=1.0, seed=11), 5)
    second = Sampler(SamplingParams(temperature=1.0, seed=11), 5)
    assert [first(LOGITS) for _ in range(50)] == [second(LOGITS) for _ in range(50)]
