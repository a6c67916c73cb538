"""A long chunk's absorbed attention, its rows in causal blocks over paged, out-of-order spans,
against the expanded form (one pass over the whole context)."""

from __future__ import annotations

import pytest
import torch

from glmcode.engine.config import ModelConfig
from glmcode.engine.kv_cache import KVSpan, LayerCache
from glmcode.engine.model.attention import CAUSAL_BLOCK_ROWS, MLAttention, SequenceSlice, SpanBatch, _causal_blocks
from tests.conftest import load_tiny_checkpoint_writer


@pytest.mark.parametrize("depth, rows", [(0, 300), (37, 128), (37, 129), (100, 40)])
def test_absorbed_blocks_equal_the_expanded_form(depth, rows):
    gen = torch.Generator().manual_seed(depth + rows)
    config = ModelConfig.from_dict(load_tiny_checkpoint_writer().DEFAULTS | {"vocab_size": 384, "model_type": "glm4_moe_lite"})
    attn = MLAttention(config).double()
    with torch.no_grad():
        for param in attn.kv_b_proj.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=torch.float64) * param.shape[-1] ** -0.5)
    context = depth + rows
    # the context in three runs of slots, out of order, the last run going past the last row
    spans = [KVSpan(600, 50), KVSpan(0, 200), KVSpan(300, context - 250 + 16)]
    cache = LayerCache(torch.randn(800, config.kv_cache_dim, generator=gen, dtype=torch.float64), None, 16,
                       torch.float64, config.kv_lora_rank)  # fmt: skip
    heads = config.num_attention_heads
    q_nope = torch.randn(rows, heads, config.qk_nope_head_dim, generator=gen, dtype=torch.float64)
    q_pe = torch.randn(rows, heads, config.qk_rope_head_dim, generator=gen, dtype=torch.float64)

    def attend(expanded: bool) -> torch.Tensor:
        batch = SpanBatch(positions=torch.arange(depth, context), write_slots=torch.arange(depth, context),
                          sequences=[SequenceSlice(slice(0, rows), depth, spans)], expanded=expanded)  # fmt: skip
        return batch.attend(attn, q_nope, q_pe, cache)

    torch.testing.assert_close(attend(expanded=False), attend(expanded=True), atol=1e-6, rtol=1e-5)  # the softmax is in float32


def test_each_block_attends_up_to_its_own_last_row():
    spans = [KVSpan(600, 50), KVSpan(0, 400)]
    seq = SequenceSlice(slice(10, 10 + 2 * CAUSAL_BLOCK_ROWS + 44), 30, spans)
    blocks = list(_causal_blocks(seq, CAUSAL_BLOCK_ROWS))
    assert [(b.rows.start, b.rows.stop, b.first_position) for b in blocks] == [
        (10, 10 + CAUSAL_BLOCK_ROWS, 30),
        (10 + CAUSAL_BLOCK_ROWS, 10 + 2 * CAUSAL_BLOCK_ROWS, 30 + CAUSAL_BLOCK_ROWS),
        (10 + 2 * CAUSAL_BLOCK_ROWS, 10 + 2 * CAUSAL_BLOCK_ROWS + 44, 30 + 2 * CAUSAL_BLOCK_ROWS),
    ]
    for block in blocks:
        assert sum(span.length for span in block.spans) == block.first_position + block.rows.stop - block.rows.start
        assert block.spans[0] == KVSpan(600, 50) and all(span.slot in (600, 0) for span in block.spans)
