"""The engine's public face: load a checkpoint (or take a built model), then generate, stream or score.

`LLM` owns four parts and one loop. The block manager hands out KV cache blocks (with prefix
caching), the scheduler decides what to compute next, the runner computes it on this machine's
execution path, and each request's sampler picks its tokens. One step of the loop is one
scheduled piece of work: a prefill chunk or a batched decode step.

Any thread may submit requests and read their outputs. A consumer that needs tokens takes the
engine lock and runs steps (for every request) until its own tokens arrive; a consumer that
stops early frees its sequence at once (its full blocks stay in the prefix cache), and so does
one that cancels its stream from another thread (`RequestStream.cancel`).

With `disk_cache_dir` the prefix cache gets a disk tier (disk_cache.py): full blocks are saved
under a fingerprint of the model and its settings and read back by later engines, in this
process or another one. `close()` waits until they are written.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmcode.engine.block_manager import BlockManager
from glmcode.engine.config import ModelConfig, resolve_dtype
from glmcode.engine.disk_cache import DiskCache, checkpoint_identity, fingerprint
from glmcode.engine.kv_cache import KVCache, attention_dtype, blocks_for_budget, default_budget
from glmcode.engine.model import GlmMoeLite
from glmcode.engine.options import EngineOptions
from glmcode.engine.runner import select_runner
from glmcode.engine.sampler import Sampler, SamplingParams
from glmcode.engine.scheduler import DecodeStep, PrefillChunk, Scheduler
from glmcode.engine.sequence import RequestStats, Sequence
from glmcode.engine.tokenizer import IncrementalDecoder, Tokenizer
from glmcode.engine.weights.loader import load_model
from glmcode.errors import ContextOverflow, UsageError


@dataclass
class StreamOutput:
    token_ids: list[int]  # ids produced since the previous output
    text: str  # text produced since the previous output (whole characters only)
    finish_reason: str | None = None  # "stop" or "length" on the last output
    stats: RequestStats = field(default_factory=RequestStats)  # this request's, so far


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats = field(default_factory=RequestStats)


class LLM:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        quantization: str | None = None,
        progress: bool = True,
        **options,
    ):
        """Options (see EngineOptions): kv_cache_memory, kv_cache_dtype ("int8" on CPU, "fp8" on
        the kernel path), block_size, max_num_seqs, enable_prefix_caching, prefill_chunk_tokens,
        kernel_path (the GPU kernels; None means on CUDA devices), disk_cache_dir (the prefix
        cache's disk tier; None: none), disk_cache_budget (its size in bytes) and weights_cache_dir
        (where a quantized CPU model is saved as built and mapped back by later loads; None: none)."""
        engine_options = EngineOptions.resolve(device=device, progress=progress, **options)
        if quantization is not None and engine_options.kernel_path:
            raise UsageError(f"quantization {quantization!r} runs on the CPU path only; leave it unset on CUDA")
        config = ModelConfig.from_dir(model_dir)
        tokenizer = Tokenizer(model_dir)
        model = load_model(model_dir, config, dtype=resolve_dtype(dtype, config), device=engine_options.device,
                           quantization=quantization, progress=progress, snapshot_dir=engine_options.weights_cache_dir)  # fmt: skip
        identity = {**checkpoint_identity(model_dir), "quantization": quantization} if engine_options.disk_cache_dir else None
        self._start(model, tokenizer, engine_options, identity)

    @classmethod
    def from_model(cls, model: GlmMoeLite, tokenizer: Tokenizer, *, identity: str | None = None, **options) -> LLM:
        """An engine over a model built elsewhere (random weights for a benchmark, a test's edits).

        identity: what names these weights for the disk tier (e.g. "random int4, seed 0");
        a disk_cache_dir needs one, since nothing else tells these weights from others.
        """
        engine_options = EngineOptions.resolve(device=_device_of(model), **options)
        if engine_options.disk_cache_dir is not None and identity is None:
            raise UsageError("a disk cache for a model built in memory needs its identity (LLM.from_model(identity=...))")
        llm = cls.__new__(cls)
        llm._start(model, tokenizer, engine_options, {"model": identity})
        return llm

    def _start(self, model: GlmMoeLite, tokenizer: Tokenizer, options: EngineOptions, identity: dict | None) -> None:
        self.model, self.config, self.tokenizer, self.options = model, model.config, tokenizer, options
        self.device, self.kernel_path, self.block_size = options.device, options.kernel_path, options.block_size
        self.dtype = model.model.embed_tokens.weight.dtype
        storage = options.storage_dtype(self.dtype)
        budget = options.kv_cache_memory if options.kv_cache_memory is not None else default_budget(self.device)
        num_blocks = blocks_for_budget(self.config, self.block_size, storage, budget)
        # The kernel path gets one block more than the manager hands out: the scratch block that
        # the padded rows of a CUDA-graph batch write to.
        cache_blocks = num_blocks + 1 if self.kernel_path else num_blocks
        self.kv_cache = KVCache(self.config, cache_blocks, self.block_size, storage, self.device,
                                compute_dtype=attention_dtype(self.dtype, self.device))
        self.disk_cache = None
        if options.disk_cache_dir is not None and options.enable_prefix_caching:
            self.fingerprint = fingerprint({**identity, "dtype": str(self.dtype), "kv_dtype": str(storage),
                                            "block_size": self.block_size, "device": self.device.type,
                                            "kernel_path": self.kernel_path})  # fmt: skip
            self.disk_cache = DiskCache(options.disk_cache_dir, self.fingerprint, self.kv_cache,
                                        budget=options.disk_cache_budget)  # fmt: skip
        self.blocks = BlockManager(num_blocks, self.block_size, options.enable_prefix_caching, self.disk_cache)
        self.max_context = min(self.config.max_position_embeddings, num_blocks * self.block_size)
        model.rotary.reserve(self.max_context, self.device)
        self.runner = select_runner(model, self.kv_cache, kernel_path=self.kernel_path, max_num_seqs=options.max_num_seqs,
                                    max_context=self.max_context, scratch_slot=num_blocks * self.block_size)  # fmt: skip
        self.scheduler = Scheduler(self.blocks, max_num_seqs=options.max_num_seqs,
                                   prefill_chunk_tokens=options.prefill_chunk_tokens, no_room=self._no_room_message)  # fmt: skip
        self.num_real_tokens = min(tokenizer.vocab_size, self.config.vocab_size)
        self.default_stop_ids = tokenizer.stop_token_ids() or list(self.config.eos_token_ids)
        self._lock = threading.RLock()  # one step at a time
        self._cancelled: list[Sequence] = []  # cancelled while another thread ran a step

    # ----- public API -----

    def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> Completion:
        token_ids: list[int] = []
        text: list[str] = []
        output = StreamOutput([], "")
        for output in self.stream(prompt_token_ids, params):
            token_ids += output.token_ids
            text.append(output.text)
        return Completion(token_ids, "".join(text), output.finish_reason or "", output.stats)

    def generate_batch(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Several requests at once, decoded together; results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        seqs = [self._new_sequence(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        for seq in seqs:
            self.scheduler.add(seq)
        try:
            for seq in seqs:
                self._take_tokens(seq, until_finished=True)
        finally:
            self._abort_unfinished(seqs)
        return [Completion(s.completion_ids, self.tokenizer.decode(s.completion_ids), s.finish_reason, s.stats) for s in seqs]

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> RequestStream:
        """Yields outputs as tokens are produced. Stopping iteration early cancels the request."""
        seq = self._new_sequence(prompt_token_ids, params)  # errors surface here, not mid-stream
        return RequestStream(self, seq)

    def close(self) -> None:
        """Write what the disk tier still has queued. The engine stays usable."""
        if self.disk_cache is not None:
            self.disk_cache.flush()

    def score(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab_size] computed by the prefill path, no cache reuse."""
        seq = self._new_sequence(token_ids, SamplingParams(max_tokens=1))
        with self._lock, torch.inference_mode():
            if not self.blocks.allocate(seq, use_prefix_cache=False):
                raise ContextOverflow(self._no_room_message(len(seq)))
            try:
                hidden = []
                chunk = self.options.prefill_chunk_tokens
                for start in range(0, len(seq), chunk):
                    end = min(len(seq), start + chunk)
                    hidden.append(self.runner.prefill(seq, start, end))
                    self._computed(seq, end)
                return self.runner.logits(torch.cat(hidden)).cpu()
            finally:
                self.blocks.free_sequence(seq)

    # ----- the loop -----

    def _stream(self, seq: Sequence) -> Iterator[StreamOutput]:
        decoder = IncrementalDecoder(self.tokenizer)
        self.scheduler.add(seq)
        try:
            while True:
                new_ids = self._take_tokens(seq)
                text = decoder.add(new_ids)
                if seq.finished:
                    text += decoder.flush()
                yield StreamOutput(new_ids, text, seq.finish_reason if seq.finished else None, seq.stats)
                if seq.finished:
                    return
        finally:
            self._abort_unfinished([seq])

    def _take_tokens(self, seq: Sequence, until_finished: bool = False) -> list[int]:
        """Runs steps until `seq` has new tokens (or is finished); returns them."""
        with self._lock:
            while not seq.finished and (until_finished or not seq.pending):
                if not self._step() and not seq.finished:  # (a step may retire it: cancelled)
                    raise RuntimeError("the engine has no work, yet a request is unfinished")
            if seq.error is not None:
                raise seq.error
            new_ids, seq.pending = seq.pending, []
            return new_ids

    def _cancel(self, seq: Sequence) -> None:
        """Retire a request from any thread: now if no step runs, else right after the one in flight."""
        self._cancelled.append(seq)  # list.append is atomic; a stepping thread retires it
        if self._lock.acquire(blocking=False):
            try:
                self._retire_cancelled()
            finally:
                self._lock.release()

    def _retire_cancelled(self) -> None:
        while self._cancelled:
            seq = self._cancelled.pop()
            if not seq.finished:
                self.scheduler.finish(seq, "abort")

    @torch.inference_mode()
    def _step(self) -> bool:
        """Runs the next scheduled piece of work; False when there is none."""
        self._retire_cancelled()
        work = self.scheduler.schedule()
        if isinstance(work, PrefillChunk):
            self._prefill(work)
        elif isinstance(work, DecodeStep):
            self._decode(work.seqs)
        return work is not None

    def _prefill(self, chunk: PrefillChunk) -> None:
        seq = chunk.seq
        hidden = self.runner.prefill(seq, chunk.start, chunk.end)
        self._computed(seq, chunk.end)
        seq.stats.prefilled_tokens += chunk.end - chunk.start
        if chunk.completes_prefill:
            logits = self.runner.logits(hidden[-1:])[0]
            if logits.is_cuda:  # GPU work is asynchronous; the sampler would wait for it anyway
                torch.cuda.synchronize(logits.device)
            self._accept(seq, seq.sampler(logits))

    def _decode(self, seqs: list[Sequence]) -> None:
        started = time.perf_counter()
        logits = self.runner.decode(seqs)
        for seq in seqs:
            self._computed(seq, len(seq))
        tokens = [seq.sampler(row) for seq, row in zip(seqs, logits)]
        elapsed = time.perf_counter() - started
        for seq, token in zip(seqs, tokens):
            if seq.stats.prefill_seconds:  # not its first token (that one counts as prefill)
                seq.stats.decode_seconds += elapsed
                seq.stats.decode_tokens += 1
            self._accept(seq, token)

    def _computed(self, seq: Sequence, end: int) -> None:
        """The latents of positions up to `end` are in the cache: register its full blocks."""
        seq.num_computed = end
        self.blocks.commit(seq)

    def _accept(self, seq: Sequence, token: int) -> None:
        if not seq.stats.prefill_seconds:
            seq.stats.prefill_seconds = time.perf_counter() - seq.admitted_at
        self.scheduler.accept(seq, token, self.max_context)

    def _abort_unfinished(self, seqs: list[Sequence]) -> None:
        with self._lock:  # after the step in flight, if any
            for seq in seqs:
                if not seq.finished:
                    self.scheduler.finish(seq, "abort")

    # ----- requests -----

    def _new_sequence(self, prompt_token_ids: list[int], params: SamplingParams | None) -> Sequence:
        params = params or SamplingParams()
        prompt = [int(t) for t in prompt_token_ids]
        if not prompt:
            raise UsageError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"token id {bad[0]} is outside the vocabulary (size {self.config.vocab_size})")
        if len(prompt) > self.max_context:
            raise ContextOverflow(self._no_room_message(len(prompt)))
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else params.stop_token_ids
        return Sequence(
            token_ids=prompt,
            num_prompt_tokens=len(prompt),
            params=params,
            stop_ids=frozenset(stop_ids),
            sampler=Sampler(params, self.num_real_tokens),
            stats=RequestStats(prompt_tokens=len(prompt)),
        )

    def _no_room_message(self, num_tokens: int) -> str:
        return (
            f"request of {num_tokens} tokens does not fit: the context holds {self.max_context} tokens "
            f"(model limit {self.config.max_position_embeddings}, KV cache "
            f"{self.blocks.num_blocks * self.block_size}); shorten the conversation or give the "
            f"KV cache more memory"
        )


class RequestStream:
    """The outputs of one request, as an iterator. `close()` (or dropping it) cancels the request
    from the consuming thread; `cancel()` does so from any other thread, and the stream then ends
    without a further output."""

    def __init__(self, llm: LLM, seq: Sequence):
        self._llm, self._seq = llm, seq
        self._outputs = llm._stream(seq)

    def __iter__(self) -> RequestStream:
        return self

    def __next__(self) -> StreamOutput:
        return next(self._outputs)

    def close(self) -> None:
        self._outputs.close()

    def cancel(self) -> None:
        self._llm._cancel(self._seq)

    @property
    def stats(self) -> RequestStats:
        return self._seq.stats


def _device_of(model: GlmMoeLite) -> torch.device:
    return model.model.embed_tokens.weight.device
