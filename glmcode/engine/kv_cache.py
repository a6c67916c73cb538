"""The paged latent KV cache: one tensor of fixed-size blocks and the manager that hands them out.

Each sequence owns a block table (block ids in position order). A block that is full and whose
latents are written gets a hash chained over all tokens before it, so a later prompt with the
same prefix reuses it instead of recomputing it. Blocks are reference counted; a block nobody
uses goes back to the free list but keeps its contents and hash until it is handed out again,
least recently freed first (LRU).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.model.attention import KVSpan
from glmcode.engine.quant.latent_cache import Int8LatentCache


@dataclass
class Sequence:
    """One request's tokens and its place in the cache."""

    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose latents are in the cache
    num_hashed_blocks: int = 0  # leading blocks registered in the prefix cache
    last_hash: int | None = None  # hash of the last registered block

    def __len__(self) -> int:
        return len(self.token_ids)


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the tokens a hashed block holds, to rule out collisions


class KVCache:
    """Latents of all layers: data[layer] is a flat [num_blocks * block_size, 576] slot array."""

    def __init__(self, config: ModelConfig, num_blocks: int, block_size: int, dtype, device, int8: bool = False):
        """int8: store latents as int8 with per-token scales (quant.Int8LatentCache per layer)."""
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = num_blocks * block_size
        if int8:
            self.data = [
                Int8LatentCache(slots, config.kv_cache_dim, config.kv_lora_rank, dtype, device)
                for _ in range(config.num_hidden_layers)
            ]
        else:
            # Zeros, not garbage: decode reads whole blocks, and the masked tail of a sequence's
            # last block must hold finite values (0 * NaN would poison the attention output).
            self.data = torch.zeros(config.num_hidden_layers, slots, config.kv_cache_dim, dtype=dtype, device=device)
        # A float8 cache (the CUDA path's option) keeps one float32 scale per token and layer.
        self.scales = None
        if dtype == torch.float8_e4m3fn:
            self.scales = torch.zeros(config.num_hidden_layers, slots, dtype=torch.float32, device=device)

    @staticmethod
    def bytes_per_block(config: ModelConfig, block_size: int, dtype: torch.dtype, int8: bool = False) -> int:
        if int8:
            per_token = Int8LatentCache.bytes_per_token(config.kv_cache_dim)
        else:
            per_token = config.kv_cache_dim * torch.empty(0, dtype=dtype).element_size()
        if dtype == torch.float8_e4m3fn:
            per_token += 4  # its scale
        return config.num_hidden_layers * block_size * per_token

    def slots(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end) of a sequence."""
        size, table = self.block_size, seq.block_table
        return [table[pos // size] * size + pos % size for pos in range(start, end)]

    def spans(self, seq: Sequence, end: int, whole_blocks: bool = False) -> list[KVSpan]:
        """Positions [0, end) of a sequence as runs of consecutive slots (few when blocks are).

        whole_blocks: extend the last run to the end of its block. Attention masks the extra
        slots, and the matrix shapes then change once per block instead of once per token
        (on CPU each new shape costs a kernel compilation of several milliseconds).
        """
        size = self.block_size
        if whole_blocks:
            end = (end + size - 1) // size * size
        spans: list[KVSpan] = []
        for index in range((end + size - 1) // size):
            slot = seq.block_table[index] * size
            length = min(size, end - index * size)
            last = spans[-1] if spans else None
            if last is not None and last.slot + last.length == slot:
                spans[-1] = KVSpan(last.slot, last.length + length)
            else:
                spans.append(KVSpan(slot, length))
        return spans


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
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
        seq.block_table = hits + [self._take_fresh() for _ in range(fresh_needed)]
        seq.num_computed = len(hits) * self.block_size
        seq.num_hashed_blocks = len(hits)
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
            block_hash = hash((seq.last_hash, tokens))
            block = self.blocks[seq.block_table[index]]
            block.hash, block.token_ids = block_hash, tokens
            self.hash_to_block[block_hash] = block.block_id
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
            block_hash = hash((last_hash, tokens))
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            hits.append(block_id)
            last_hash = block_hash
        return hits, last_hash

    def _take_fresh(self) -> int:
        block_id, _ = self.free.popitem(last=False)
        block = self.blocks[block_id]
        if block.hash is not None and self.hash_to_block.get(block.hash) == block_id:
            del self.hash_to_block[block.hash]
        block.hash, block.token_ids, block.ref_count = None, (), 1
        return block_id
