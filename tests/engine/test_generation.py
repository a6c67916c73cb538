"""Paged decode, prefix caching, chunked prefill and batching all equal full recomputation."""

from __future__ import annotations

import threading

import pytest
import torch

from glmcode.engine import LLM, SamplingParams
from glmcode.engine.config import ModelConfig
from glmcode.engine.kv_cache import KVCache
from glmcode.engine.model import attention
from glmcode.engine.model.attention import expanded_is_cheaper
from glmcode.errors import ContextOverflow, UsageError
from tests.engine.stepping import new_sequence, teacher_forced_logits

GREEDY = SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[])
TEXT = "class Stack:\n    def push(self, item):\n        self.items.append(item)  # héllo 日本語 🙂\n"


def make_llm(path, **kwargs) -> LLM:
    options = {"dtype": "float32", "kv_cache_memory": 8 << 20, "block_size": 16, "progress": False}
    return LLM(path, **(options | kwargs))


@pytest.fixture(scope="module")
def llm(tiny_checkpoint) -> LLM:
    return make_llm(tiny_checkpoint)


def block_bytes(path, block_size: int = 16) -> int:
    return KVCache.bytes_per_block(ModelConfig.from_dir(path), block_size, torch.float32)


def prompt(llm: LLM, repeats: int = 2) -> list[int]:
    return llm.tokenizer.encode(TEXT * repeats)


def fragment_free_list(llm: LLM) -> None:
    """Leave every other block in use, so new sequences get non-consecutive blocks."""
    manager = llm.blocks
    holders = [new_sequence([1]) for _ in range(len(manager.free))]
    for holder in holders:
        assert manager.allocate(holder, use_prefix_cache=False)
    for holder in holders[::2]:
        manager.free_sequence(holder)


@pytest.mark.parametrize("block_size", [3, 16, 256])
def test_absorbed_paged_decode_equals_prefill_logits(tiny_checkpoint, block_size):
    llm = make_llm(tiny_checkpoint, block_size=block_size)
    tokens = prompt(llm, 3)
    expected = llm.score(tokens)
    fragment_free_list(llm)
    decoded = teacher_forced_logits(llm, tokens, prefill_len=7)
    torch.testing.assert_close(decoded, expected[6:], atol=1e-4, rtol=0)


@pytest.mark.parametrize("chunk, long_context", [(7, False), (100, False), (100, True)])
def test_chunked_prefill_in_small_pieces_equals_one_pass(tiny_checkpoint, llm, chunk, long_context, monkeypatch):
    tokens = prompt(llm, 3)
    assert len(tokens) > chunk
    # 7-token chunks attend in the absorbed form, 100-token chunks expand the context, unless it
    # counts as long: then they take the absorbed form's many-query products.
    if long_context:
        monkeypatch.setattr(attention, "EXPANDED_MAX_CONTEXT", 0)
    assert expanded_is_cheaper(llm.config, chunk, len(tokens)) == (chunk == 100 and not long_context)
    chunked = make_llm(tiny_checkpoint, prefill_chunk_tokens=chunk, block_size=4)
    chunked.runner.max_score_elements = 4 * chunk * 5  # 4 heads: the context goes 5 keys at a time
    fragment_free_list(chunked)
    torch.testing.assert_close(chunked.score(tokens), llm.score(tokens), atol=1e-4, rtol=0)
    assert chunked.generate(tokens, GREEDY).token_ids == llm.generate(tokens, GREEDY).token_ids


def test_warm_prefix_cache_gives_the_same_tokens_as_a_cold_start(tiny_checkpoint):
    warm = make_llm(tiny_checkpoint, block_size=8)
    cold = make_llm(tiny_checkpoint, block_size=8, enable_prefix_caching=False)
    first = prompt(warm)
    step1 = warm.generate(first, GREEDY)
    assert step1.stats.cached_tokens == 0

    # The agent's next step: the old prompt, the model's answer, and something new.
    second = first + step1.token_ids + warm.tokenizer.encode("<|observation|>result ok")
    step2 = warm.generate(second, GREEDY)
    assert step2.stats.cached_tokens >= len(first) - 8
    assert step2.stats.cached_tokens % 8 == 0
    assert step2.stats.prefilled_tokens == len(second) - step2.stats.cached_tokens
    assert step2.stats.prompt_tokens == len(second)

    reference = cold.generate(second, GREEDY)
    assert reference.stats.cached_tokens == 0
    assert step2.token_ids == reference.token_ids


def test_batch_of_different_lengths_equals_one_at_a_time(tiny_checkpoint, llm):
    prompts = [prompt(llm, n)[: 9 + 13 * n] for n in (1, 2, 3, 4)]
    expected = [llm.generate(p, GREEDY).token_ids for p in prompts]
    batched = make_llm(tiny_checkpoint, block_size=4, max_num_seqs=3)
    results = batched.generate_batch(prompts, GREEDY)
    assert [r.token_ids for r in results] == expected
    assert all(r.finish_reason == "length" for r in results)
    assert results[0].text == llm.tokenizer.decode(expected[0])


def test_batch_under_cache_pressure_preempts_and_still_matches(tiny_checkpoint, llm):
    prompts = [prompt(llm, 2)[:40], prompt(llm, 2)[:33]]
    expected = [llm.generate(p, GREEDY).token_ids for p in prompts]
    memory = 20 * block_bytes(tiny_checkpoint, block_size=4)  # 80 tokens for 2 x (~36 + 24)
    tight = make_llm(tiny_checkpoint, block_size=4, kv_cache_memory=memory)
    assert [r.token_ids for r in tight.generate_batch(prompts, GREEDY)] == expected
    assert len(tight.blocks.free) == tight.blocks.num_blocks


def test_abandoned_stream_frees_its_blocks_and_keeps_the_prefix_cached(llm):
    tokens = prompt(llm, 3)
    stream = llm.stream(tokens, GREEDY)
    outputs = [next(stream) for _ in range(3)]
    assert all(len(o.token_ids) == 1 and o.finish_reason is None for o in outputs)
    assert len(llm.blocks.free) < llm.blocks.num_blocks
    stream.close()
    assert len(llm.blocks.free) == llm.blocks.num_blocks
    again = llm.generate(tokens + [o.token_ids[0] for o in outputs], GREEDY)
    assert again.stats.cached_tokens >= len(tokens) - llm.block_size


def test_interleaved_streams_each_report_their_own_stats(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, block_size=8)
    short, long = llm.tokenizer.encode("def pop(self):\n    return self.items.pop()\n"), prompt(llm, 3)
    llm.generate(long, GREEDY)  # long is now in the prefix cache; short is not
    streams = [llm.stream(short, GREEDY), llm.stream(long, GREEDY)]
    finals = {}
    while streams:
        for stream in list(streams):
            output = next(stream, None)
            if output is None:
                streams.remove(stream)
            else:
                finals[id(stream)] = output
    short_stats, long_stats = finals.values()
    assert (short_stats.stats.prompt_tokens, long_stats.stats.prompt_tokens) == (len(short), len(long))
    assert short_stats.stats.cached_tokens == 0 and long_stats.stats.cached_tokens >= len(long) - 8
    assert short_stats.stats.decode_tokens == long_stats.stats.decode_tokens == GREEDY.max_tokens - 1


def test_requests_from_several_threads_decode_together_and_match_one_at_a_time(tiny_checkpoint, llm):
    prompts = [prompt(llm, n)[: 7 + 11 * n] for n in (1, 2, 3, 4)]
    expected = [llm.generate(p, GREEDY).token_ids for p in prompts]
    shared = make_llm(tiny_checkpoint, block_size=4, max_num_seqs=4)
    results: dict[int, list[int]] = {}
    abandoned_after: list[int] = []

    def consume(index: int) -> None:
        results[index] = [t for output in shared.stream(prompts[index], GREEDY) for t in output.token_ids]

    def abandon() -> None:  # a client that goes away mid-stream
        stream = shared.stream(prompts[0], GREEDY)
        abandoned_after.extend(next(stream).token_ids)
        stream.close()

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(len(prompts))]
    threads.append(threading.Thread(target=abandon))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert [results[i] for i in range(len(prompts))] == expected
    # its first output holds whatever tokens other threads' steps made for it before it looked
    assert abandoned_after and abandoned_after == expected[0][: len(abandoned_after)]
    assert len(shared.blocks.free) == shared.blocks.num_blocks and not shared.scheduler.has_work()


def test_stream_and_generate_agree(llm):
    tokens = prompt(llm)
    outputs = list(llm.stream(tokens, GREEDY))
    completion = llm.generate(tokens, GREEDY)
    assert [t for o in outputs for t in o.token_ids] == completion.token_ids
    assert "".join(o.text for o in outputs) == completion.text == llm.tokenizer.decode(completion.token_ids)
    assert [o.finish_reason for o in outputs][-1] == "length"
    assert all(o.finish_reason is None for o in outputs[:-1])


def test_stop_token_ends_generation_and_is_not_returned(llm):
    tokens = prompt(llm)
    free_run = llm.generate(tokens, GREEDY).token_ids
    stop = free_run[5]
    first_stop = free_run.index(stop)
    stopped = llm.generate(tokens, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=[stop]))
    assert stopped.finish_reason == "stop"
    assert stopped.token_ids == free_run[:first_stop]


def test_default_stop_tokens_are_looked_up_by_string(llm):
    names = ("<|endoftext|>", "<|user|>", "<|observation|>")
    assert sorted(llm.default_stop_ids) == sorted(llm.tokenizer.token_to_id(n) for n in names)


def test_padded_vocabulary_rows_are_never_sampled(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint)
    real = llm.num_real_tokens
    assert real < llm.config.vocab_size
    # Make every padded row the strongest possible: a scaled copy of the current favourite.
    tokens = prompt(llm)
    favourite = int(llm.score(tokens)[-1].argmax())
    llm.model.lm_head.weight[real:] = 50 * llm.model.lm_head.weight[favourite]
    assert int(llm.score(tokens)[-1].argmax()) >= real
    for params in (GREEDY, SamplingParams(max_tokens=24, temperature=1.0, seed=3)):
        assert all(t < real for t in llm.generate(tokens, params).token_ids)


def test_seeded_sampling_is_reproducible(llm):
    tokens = prompt(llm)
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, top_k=50, min_p=0.01, seed=7)
    first = llm.generate(tokens, params).token_ids
    assert first == llm.generate(tokens, params).token_ids
    assert len(first) == 16


def test_prompt_longer_than_the_context_is_refused_up_front(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, kv_cache_memory=None)
    assert llm.max_context == llm.config.max_position_embeddings
    with pytest.raises(ContextOverflow, match="does not fit"):
        llm.stream([1] * (llm.max_context + 1), GREEDY)


def test_prompt_longer_than_the_cache_pool_is_refused(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, kv_cache_memory=4 * block_bytes(tiny_checkpoint))
    assert llm.max_context == 64
    with pytest.raises(ContextOverflow, match="KV cache 64"):
        llm.generate([1] * 65, GREEDY)
    with pytest.raises(ContextOverflow):
        llm.score([1] * 65)


def test_generation_stops_at_the_end_of_the_context(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint, kv_cache_memory=2 * block_bytes(tiny_checkpoint))
    completion = llm.generate([5] * 30, SamplingParams(max_tokens=100, temperature=0, stop_token_ids=[]))
    assert completion.finish_reason == "length"
    assert len(completion.token_ids) == 2


def test_bad_arguments_are_usage_errors(tiny_checkpoint, llm):
    with pytest.raises(UsageError, match="quantization"):
        LLM(tiny_checkpoint, quantization="int3", progress=False)
    with pytest.raises(UsageError, match="dtype"):
        LLM(tiny_checkpoint, dtype="float64", progress=False)
    with pytest.raises(UsageError, match="outside the vocabulary"):
        llm.generate([llm.config.vocab_size], GREEDY)
    with pytest.raises(UsageError, match="empty"):
        llm.generate([], GREEDY)
    with pytest.raises(UsageError, match="top_p"):
        SamplingParams(top_p=0)


def test_cancel_from_another_thread_frees_the_sequence(tiny_checkpoint):
    llm = LLM(tiny_checkpoint, dtype="float32", block_size=16, kv_cache_memory=4 << 20, progress=False)
    free_before = len(llm.blocks.free)
    stream = llm.stream(list(range(40)), SamplingParams(max_tokens=1000, temperature=0, stop_token_ids=[]))
    first = next(stream)
    assert first.token_ids and len(llm.blocks.free) < free_before
    stream.cancel()  # no step is in flight: retired at once
    assert len(llm.blocks.free) == free_before
    with pytest.raises(StopIteration):  # the stream simply ends
        next(stream)
