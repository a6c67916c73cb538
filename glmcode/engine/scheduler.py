"""Decides what the engine computes next: a prefill chunk of one sequence, or a decode step for many.

Sequences wait in arrival order until the block manager can give them blocks for all their
tokens (admission, which reuses cached prefix blocks). A running sequence whose uncomputed
tokens are more than its last one is prefilled chunk by chunk; the others decode together in one
batch. When both kinds are ready the two alternate, so a long prompt delays the other streams by
one chunk at a time, not by its whole prefill. When a decode step has no slot for some
sequence's next token, the newest running sequence is preempted: its blocks go back to the pool
(their full blocks stay in the prefix cache) and it waits again at the front of the queue.

Every method takes the scheduler's lock, so requests can be added and aborted from any thread
while another one runs the engine.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from glmcode.engine.block_manager import BlockManager
from glmcode.engine.sequence import Sequence
from glmcode.errors import ContextOverflow


@dataclass(frozen=True)
class PrefillChunk:
    seq: Sequence
    start: int
    end: int

    @property
    def completes_prefill(self) -> bool:
        return self.end == len(self.seq)


@dataclass(frozen=True)
class DecodeStep:
    seqs: list[Sequence]


Work = PrefillChunk | DecodeStep


class Scheduler:
    def __init__(self, blocks: BlockManager, *, max_num_seqs: int, prefill_chunk_tokens: int,
                 no_room: Callable[[int], str]):  # fmt: skip
        """no_room(num_tokens) -> the message for a sequence that cannot fit even in an empty pool."""
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.prefill_chunk_tokens = prefill_chunk_tokens
        self._no_room = no_room
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self._last_was_prefill = False
        self._lock = threading.RLock()

    def add(self, seq: Sequence) -> None:
        with self._lock:
            self.waiting.append(seq)

    def has_work(self) -> bool:
        with self._lock:
            return bool(self.waiting or self.running)

    def schedule(self) -> Work | None:
        """The next piece of work, or None when nothing is waiting or running."""
        with self._lock:
            self._admit()
            prefilling = [s for s in self.running if s.num_uncomputed > 1]
            decoding = [s for s in self.running if s.num_uncomputed == 1]
            if prefilling and not (decoding and self._last_was_prefill):
                self._last_was_prefill = True
                seq = prefilling[0]
                start = seq.num_computed
                return PrefillChunk(seq, start, min(len(seq), start + self.prefill_chunk_tokens))
            self._last_was_prefill = False
            decoding = self._make_room(decoding)
            return DecodeStep(decoding) if decoding else None

    def accept(self, seq: Sequence, token: int, max_context: int) -> None:
        """Append a sampled token for the consumer; retire the sequence at a stop token, its
        max_tokens or the end of the context."""
        if token in seq.stop_ids:
            self.finish(seq, "stop")
            return
        seq.token_ids.append(token)
        seq.pending.append(token)
        if len(seq.completion_ids) >= seq.params.max_tokens or len(seq) >= max_context:
            self.finish(seq, "length")

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence (finished, aborted or failed): its blocks go back to the pool."""
        with self._lock:
            seq.finish_reason = reason
            if seq in self.running:
                self.running.remove(seq)
                self.blocks.free_sequence(seq)
            elif seq in self.waiting:
                self.waiting.remove(seq)

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if not self.blocks.allocate(seq):
                if not self.running:  # an empty pool cannot hold it: it never will
                    self.waiting.popleft()
                    seq.error = ContextOverflow(self._no_room(len(seq)))
                    seq.finish_reason = "error"
                    continue
                return
            self.waiting.popleft()
            self.running.append(seq)
            if seq.admitted_at is None:  # the first admission, not a re-admission after preemption
                seq.admitted_at = time.perf_counter()
                seq.stats.cached_tokens = seq.num_computed

    def _make_room(self, decoding: list[Sequence]) -> list[Sequence]:
        """Give every decoding sequence a slot for its next token, preempting the newest if needed."""
        for seq in list(decoding):
            if seq not in self.running:
                continue
            while not self.blocks.grow(seq, len(seq)):
                victim = self.running.pop()  # recomputed later, mostly from the prefix cache
                self.blocks.free_sequence(victim)
                self.waiting.appendleft(victim)
                if victim is seq:
                    break
        return [s for s in decoding if s in self.running]
