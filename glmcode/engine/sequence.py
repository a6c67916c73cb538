"""One request inside the engine: its tokens, its place in the KV cache, how it is sampled, what it cost."""

from __future__ import annotations

from dataclasses import dataclass, field

from glmcode.engine.sampler import Sampler, SamplingParams


@dataclass
class RequestStats:
    """What one request cost; `cached_tokens` were served by the prefix cache."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefilled_tokens: int = 0
    prefill_seconds: float = 0.0  # time to the first token, prefill and first sample included
    decode_tokens: int = 0
    decode_seconds: float = 0.0

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else 0.0


@dataclass
class Sequence:
    """A request's tokens and its place in the cache.

    The block manager owns `block_table` and the hashing state; the scheduler owns the rest.
    """

    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    stop_ids: frozenset[int] = frozenset()
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose latents are in the cache
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    last_hash: int | None = None  # hash of the last registered block
    finish_reason: str | None = None  # "stop", "length" or "abort" once finished
    stats: RequestStats = field(default_factory=RequestStats)
    sampler: Sampler | None = None
    pending: list[int] = field(default_factory=list)  # sampled, not yet taken by the consumer
    error: Exception | None = None  # why the engine gave up on it (raised to its consumer)
    admitted_at: float | None = None  # when it first got cache blocks (its time to first token starts)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def completion_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_uncomputed(self) -> int:
        """Tokens whose latents are not in the cache yet: one for a decode step, more to prefill."""
        return len(self) - self.num_computed

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
