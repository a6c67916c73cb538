"""Driving an engine's runner by hand: prefill a sequence, then feed it chosen tokens one decode step at a time."""

from __future__ import annotations

import torch

from glmcode.engine import LLM
from glmcode.engine.sequence import Sequence


def new_sequence(tokens: list[int]) -> Sequence:
    return Sequence(token_ids=list(tokens), num_prompt_tokens=len(tokens))


@torch.inference_mode()
def prefill(llm: LLM, seq: Sequence) -> torch.Tensor:
    """Computes the sequence's uncomputed tokens in one runner call; returns the last position's logits."""
    hidden = llm.runner.prefill(seq, seq.num_computed, len(seq))
    llm._computed(seq, len(seq))
    return llm.runner.logits(hidden[-1:])[0]


@torch.inference_mode()
def decode(llm: LLM, seqs: list[Sequence], runner=None) -> torch.Tensor:
    """One decode step of each sequence's last token (the caller appended it); its logits."""
    for seq in seqs:
        assert llm.blocks.grow(seq, len(seq))
    logits = (runner or llm.runner).decode(seqs)
    for seq in seqs:
        llm._computed(seq, len(seq))
    return logits


def teacher_forced_logits(llm: LLM, tokens: list[int], prefill_len: int, runner=None) -> torch.Tensor:
    """Logits for positions prefill_len-1 .. len-1: one prefill, then one decode step per token."""
    seq = new_sequence(tokens[:prefill_len])
    assert llm.blocks.allocate(seq)
    rows = [prefill(llm, seq)]
    for token in tokens[prefill_len:]:
        seq.token_ids.append(token)
        rows.append(decode(llm, [seq], runner)[0].clone())
    llm.blocks.free_sequence(seq)
    return torch.stack(rows)
