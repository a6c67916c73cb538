"""Hands out the KV cache's blocks: per-sequence block tables, prefix caching, reference counts.

Each sequence owns a block table (block ids in position order). A block that is full and whose
latents are written gets a hash chained over all tokens before it, so a later prompt with the
same prefix reuses it instead of recomputing it. Blocks are reference counted; a block nobody
uses goes back to the free list but keeps its contents and hash until it is handed out again,
least recently freed first (LRU).

The hash is stable across processes (BLAKE2b over the previous block's hash and the tokens), so
it also names a block in the disk tier (`disk_cache.py`): an optional lower tier that is asked
for the blocks after the in-memory hits, and is handed every block this pool registers.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

from glmcode.engine.sequence import Sequence


def chain_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    """The prefix hash of a block: its tokens, chained over the hash of the block before it."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(b"\x00" * 17 if previous is None else b"\x01" + previous.to_bytes(16, "little"))
    digest.update(struct.pack(f"<{len(tokens)}I", *tokens))
    return int.from_bytes(digest.digest(), "little")


class LowerTier(Protocol):
    """Where full blocks live beyond the pool (the disk tier)."""

    def contains(self, block_hash: int) -> bool: ...

    def load(self, block_hash: int, tokens: tuple[int, ...], block_id: int) -> bool:
        """Fill pool block `block_id` with the stored block; False if it cannot be had."""
        ...

    def store(self, block_hash: int, tokens: tuple[int, ...], block_id: int) -> None: ...


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the tokens a hashed block holds, to rule out collisions


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 lower_tier: LowerTier | None = None):  # fmt: skip
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.lower_tier = lower_tier if enable_prefix_caching else None
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Free blocks, next to hand out first. Fresh pools hand out ascending ids, so a
        # sequence's blocks tend to be consecutive in memory.
        self.free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def allocate(self, seq: Sequence, *, use_prefix_cache: bool = True) -> bool:
        """Give a new sequence blocks for all its tokens, reusing cached prefix blocks.

        Returns False (and changes nothing) when there are not enough free blocks now.
        """
        hits, last_hash = self._prefix_hits(seq.token_ids) if use_prefix_cache else ([], None)
        fresh_needed = self.blocks_for(len(seq)) - len(hits)
        hits_now_free = sum(1 for block_id in hits if self.blocks[block_id].ref_count == 0)
        if fresh_needed + hits_now_free > len(self.free):
            return False
        for block_id in hits:
            if self.blocks[block_id].ref_count == 0:
                del self.free[block_id]
            self.blocks[block_id].ref_count += 1
        fresh = [self._take_fresh() for _ in range(fresh_needed)]
        loaded, last_hash = self._load_from_lower_tier(seq.token_ids, len(hits), last_hash, fresh) \
            if use_prefix_cache else (0, last_hash)  # fmt: skip
        seq.block_table = hits + fresh
        seq.num_computed = (len(hits) + loaded) * self.block_size
        seq.num_hashed_blocks = len(hits) + loaded
        seq.last_hash = last_hash
        return True

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Make room for `num_tokens` tokens in a running sequence; False when the pool is full."""
        while len(seq.block_table) * self.block_size < num_tokens:
            if not self.free:
                return False
            seq.block_table.append(self._take_fresh())
        return True

    def commit(self, seq: Sequence) -> None:
        """Register the sequence's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        size = self.block_size
        for index in range(seq.num_hashed_blocks, seq.num_computed // size):
            tokens = tuple(seq.token_ids[index * size : (index + 1) * size])
            block_hash = chain_hash(seq.last_hash, tokens)
            self._register(seq.block_table[index], block_hash, tokens)
            if self.lower_tier is not None:
                self.lower_tier.store(block_hash, tokens, seq.block_table[index])
            seq.last_hash = block_hash
            seq.num_hashed_blocks = index + 1

    def free_sequence(self, seq: Sequence) -> None:
        """Release a sequence's blocks. Hashed blocks stay cached until the pool needs them."""
        # Tail blocks first, so a shared prefix is the last to be evicted.
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free[block_id] = None
                if block.hash is None:
                    self.free.move_to_end(block_id, last=False)  # worthless: reuse first
        seq.block_table = []
        seq.num_computed = seq.num_hashed_blocks = 0
        seq.last_hash = None

    def _prefix_hits(self, token_ids: list[int]) -> tuple[list[int], int | None]:
        """Cached blocks matching the prompt's leading full blocks.

        The last prompt token is never served from the cache: its logits are needed.
        """
        if not self.enable_prefix_caching:
            return [], None
        hits: list[int] = []
        last_hash = None
        size = self.block_size
        for index in range((len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            block_hash = chain_hash(last_hash, tokens)
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            last_hash = block_hash
        return hits, last_hash

    def _load_from_lower_tier(self, token_ids: list[int], first: int, last_hash: int | None,
                              fresh: list[int]) -> tuple[int, int | None]:  # fmt: skip
        """Fill the fresh blocks that follow `first` in-memory hits from the lower tier, while it
        has them in prefix order; returns how many it filled and the hash of the last one."""
        if self.lower_tier is None:
            return 0, last_hash
        size, loaded = self.block_size, 0
        for index in range(first, (len(token_ids) - 1) // size):
            tokens = tuple(token_ids[index * size : (index + 1) * size])
            block_hash = chain_hash(last_hash, tokens)
            block_id = fresh[loaded]
            if not self.lower_tier.contains(block_hash) or not self.lower_tier.load(block_hash, tokens, block_id):
                break
            self._register(block_id, block_hash, tokens)
            loaded += 1
            last_hash = block_hash
        return loaded, last_hash

    def _register(self, block_id: int, block_hash: int, tokens: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        block.hash, block.token_ids = block_hash, tokens
        self.hash_to_block[block_hash] = block_id

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
