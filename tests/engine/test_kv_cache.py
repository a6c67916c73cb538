"""The block manager: allocation, prefix hits, reference counts, LRU reuse, spans."""

from __future__ import annotations

import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.block_manager import BlockManager
from glmcode.engine.kv_cache import KVCache, KVSpan
from glmcode.engine.sequence import Sequence


def seq(tokens: list[int]) -> Sequence:
    return Sequence(token_ids=list(tokens), num_prompt_tokens=len(tokens))


def computed(manager: BlockManager, s: Sequence) -> Sequence:
    """Pretend the sequence's latents were written, as the engine does after a forward pass."""
    s.num_computed = len(s)
    manager.commit(s)
    return s


def test_allocation_covers_every_token_and_freeing_returns_blocks():
    manager = BlockManager(num_blocks=8, block_size=4)
    s = seq(range(10))
    assert manager.allocate(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    assert len(manager.free) == 5
    manager.free_sequence(s)
    assert len(manager.free) == 8 and s.block_table == []


def test_full_blocks_of_a_shared_prefix_are_reused_but_never_the_last_token():
    manager = BlockManager(num_blocks=8, block_size=4)
    first = seq(range(12))
    assert manager.allocate(first) and first.num_computed == 0  # fresh pool: no hits
    computed(manager, first)
    assert first.num_hashed_blocks == 3

    same = seq(range(12))
    assert manager.allocate(same)
    # 12 tokens = 3 full blocks, but the last token must be recomputed: 2 blocks reused.
    assert same.block_table[:2] == first.block_table[:2]
    assert same.num_computed == 8
    assert manager.blocks[first.block_table[0]].ref_count == 2

    longer = seq(list(range(12)) + [99, 98])
    assert manager.allocate(longer)
    assert longer.block_table[:3] == first.block_table[:3] and longer.num_computed == 12

    different = seq([7] + list(range(1, 12)))
    assert manager.allocate(different)
    assert different.num_computed == 0  # the chain breaks at the first block


def test_freed_blocks_stay_cached_until_reused_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=2)
    for prompt in ([1, 2, 3], [5, 6, 7]):  # each leaves one hashed block behind
        s = seq(prompt)
        assert manager.allocate(s)
        computed(manager, s)
        manager.free_sequence(s)
    assert len(manager.free) == 4 and len(manager.hash_to_block) == 2

    again = seq([1, 2, 3])
    assert manager.allocate(again) and again.num_computed == 2  # the cache survived the free
    manager.free_sequence(again)  # [1, 2] is now the most recently freed

    # Three fresh blocks: the two partial blocks and the least recently freed hashed one go.
    big = seq([9] * 5)
    assert manager.allocate(big)
    manager.free_sequence(big)
    still_cached = seq([1, 2, 3])
    evicted = seq([5, 6, 7])
    assert manager.allocate(still_cached) and still_cached.num_computed == 2
    assert manager.allocate(evicted) and evicted.num_computed == 0


def test_partial_blocks_are_reused_before_cached_ones():
    manager = BlockManager(num_blocks=3, block_size=2)
    cached = seq([1, 2, 3])
    assert manager.allocate(cached)
    computed(manager, cached)
    full_block, partial_block = cached.block_table
    manager.free_sequence(cached)
    other = seq([7])
    assert manager.allocate(other)
    assert other.block_table == [partial_block]
    again = seq([1, 2, 3])
    assert manager.allocate(again) and again.block_table[0] == full_block and again.num_computed == 2


def test_allocation_fails_cleanly_when_the_pool_is_full():
    manager = BlockManager(num_blocks=2, block_size=4)
    holder = seq(range(8))
    assert manager.allocate(holder)
    waiting = seq(range(3))
    assert not manager.allocate(waiting)
    assert waiting.block_table == [] and len(manager.free) == 0
    assert not manager.grow(holder, 9)


def test_disabled_prefix_caching_never_hits():
    manager = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    a = seq(range(6))
    assert manager.allocate(a)
    computed(manager, a)
    manager.free_sequence(a)
    b = seq(range(6))
    assert manager.allocate(b) and b.num_computed == 0


def test_spans_merge_consecutive_blocks(tiny_checkpoint):
    config = ModelConfig.from_dir(tiny_checkpoint)
    cache = KVCache(config, num_blocks=8, block_size=4, dtype=torch.float32, device="cpu")
    s = seq(range(14))
    s.block_table = [2, 3, 4, 7]
    assert cache.spans(s, 14) == [KVSpan(8, 12), KVSpan(28, 2)]
    assert cache.slots(s, 11, 14) == [19, 28, 29]
    assert cache.data.shape == (config.num_hidden_layers, 32, config.kv_cache_dim)
