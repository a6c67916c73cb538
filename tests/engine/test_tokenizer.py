"""The tokenizer wrapper and streaming decode that never splits a character."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from glmcode.engine.tokenizer import IncrementalDecoder, Tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint) -> Tokenizer:
    return Tokenizer(tiny_checkpoint)


def test_round_trip_without_bos(tokenizer):
    text = "[gMASK]<sop><|user|>\nfix the bug in héllo.py 🙂<|assistant|><think>"
    ids = tokenizer.encode(text)
    assert ids[:2] == [tokenizer.token_to_id("[gMASK]"), tokenizer.token_to_id("<sop>")]
    assert tokenizer.decode(ids) == text
    assert tokenizer.encode("abc")[0] != tokenizer.token_to_id("[gMASK]")


def test_special_tokens_are_found_by_string(tokenizer):
    ids = [tokenizer.token_to_id(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")]
    assert all(i is not None for i in ids)
    assert tokenizer.stop_token_ids() == ids
    assert tokenizer.token_to_id("<no such token>") is None
    assert max(ids) < tokenizer.vocab_size


def stream_text(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    decoder = IncrementalDecoder(tokenizer)
    deltas = [decoder.add([i]) for i in ids]
    return deltas + [decoder.flush()]


def test_multibyte_characters_are_never_split(tokenizer):
    text = "日本語 🙂🚀 naïve → ∑"
    ids = tokenizer.encode(text)
    assert len(ids) > len(text) // 2  # several characters span more than one token
    deltas = stream_text(tokenizer, ids)
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)


@settings(max_examples=40, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab é日🙂\n<|>_")), max_size=30))
def test_streamed_text_always_equals_full_decode(tokenizer, text):
    ids = tokenizer.encode(text)
    deltas = stream_text(tokenizer, ids)
    assert "".join(deltas) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_incomplete_character_is_held_back_until_flushed(tokenizer):
    ids = tokenizer.encode("𝄞")  # unseen in training: one token per UTF-8 byte
    assert len(ids) == 4
    decoder = IncrementalDecoder(tokenizer)
    assert decoder.add(ids[:2]) == ""
    assert decoder.flush() == tokenizer.decode(ids[:2])  # the caller asked for it: replacement chars
    complete = IncrementalDecoder(tokenizer)
    assert [complete.add([i]) for i in ids] == ["", "", "", "𝄞"]
