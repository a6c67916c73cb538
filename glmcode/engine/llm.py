"""The engine's public face: load a checkpoint, then generate, stream or score token ids.

One generation loop serves every entry point: admit waiting sequences while the cache has
room (prefilling each in chunks, reusing cached prefix blocks), otherwise run one batched
decode step for all running sequences. A stream that its consumer abandons frees its sequence;
its full blocks stay in the prefix cache for the next request.
"""

from __future__ import annotations

import os
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glmcode.engine.config import ModelConfig, resolve_dtype
from glmcode.engine.cpu.fused_decode import FusedDecoder
from glmcode.engine.cuda.runner import CudaRunner
from glmcode.engine.kv_cache import BlockManager, KVCache, Sequence
from glmcode.engine.model import GlmMoeLite, build_model
from glmcode.engine.model.attention import (
    AttentionBatch,
    SequenceSlice,
    expanded_is_cheaper,
)
from glmcode.engine.quant.loader import is_quantized_checkpoint, load_quantized_model
from glmcode.engine.sampler import Sampler, SamplingParams
from glmcode.engine.tokenizer import IncrementalDecoder, Tokenizer
from glmcode.engine.weights.loader import load_checkpoint
from glmcode.errors import ContextOverflow, UsageError

CPU_KV_MEMORY_FRACTION = 0.3  # of the memory still available after the weights are loaded
GPU_KV_MEMORY_FRACTION = 0.85  # of the device memory still free after the weights are loaded


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
class StreamOutput:
    token_ids: list[int]  # ids produced since the previous output
    text: str  # text produced since the previous output (whole characters only)
    finish_reason: str | None = None  # "stop" or "length" on the last output


@dataclass
class Completion:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: RequestStats = field(default_factory=RequestStats)


@dataclass
class _Request:
    seq: Sequence
    params: SamplingParams
    sampler: Sampler
    stop_ids: frozenset[int]
    stats: RequestStats
    finish_reason: str | None = None

    @property
    def completion_ids(self) -> list[int]:
        return self.seq.token_ids[self.seq.num_prompt_tokens :]


class LLM:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        dtype: str | torch.dtype | None = None,
        quantization: str | None = None,
        kv_cache_memory: int | None = None,
        kv_cache_dtype: str | None = None,
        block_size: int | None = None,
        max_num_seqs: int = 8,
        enable_prefix_caching: bool = True,
        prefill_chunk_tokens: int | None = None,
        progress: bool = True,
        kernel_path: bool | None = None,
    ):
        """kv_cache_dtype: None (the model dtype), "int8" (int8 latents with per-token scales; CPU
        path) or "fp8" (float8 latents with per-token scales; kernel path). kernel_path: run
        prefill and decode through the GPU kernels (cuda_runner); None means on CUDA devices only.
        True on a CPU runs that same code through the kernels' PyTorch references, which is how
        the tests check it."""
        self.device = torch.device(device)
        self.kernel_path = self.device.type == "cuda" if kernel_path is None else kernel_path
        self.kv_cache_dtype = _kv_cache_dtype(kv_cache_dtype, self.kernel_path)
        if quantization is not None and self.kernel_path:
            raise UsageError(f"quantization {quantization!r} runs on the CPU path only; leave it unset on CUDA")
        self.config = ModelConfig.from_dir(model_dir)
        self.tokenizer = Tokenizer(model_dir)
        self.dtype = resolve_dtype(dtype, self.config)
        self.kv_cache_dtype = self.kv_cache_dtype or self.dtype
        if quantization is not None or is_quantized_checkpoint(model_dir):
            self.model: GlmMoeLite = load_quantized_model(
                self.config, model_dir, dtype=self.dtype, device=self.device, quantization=quantization, progress=progress
            )
        else:
            self.model = build_model(self.config, self.dtype, self.device)
            load_checkpoint(self.model, model_dir, progress=progress)

        on_cpu = self.device.type == "cpu"
        self.block_size = block_size or (256 if on_cpu else 64)
        self.prefill_chunk_tokens = prefill_chunk_tokens or (512 if on_cpu else 4096)
        # Attention scores of one context piece are kept under this many elements.
        self.max_score_elements = 1 << 24
        self.max_num_seqs = max_num_seqs
        self.kv_int8 = kv_cache_dtype == "int8"
        num_blocks = self._plan_num_blocks(kv_cache_memory)
        # The kernel path gets one block more than the manager hands out: the scratch block that
        # the padded rows of a CUDA-graph batch write to.
        cache_blocks = num_blocks + 1 if self.kernel_path else num_blocks
        self.kv_cache = KVCache(self.config, cache_blocks, self.block_size, self.kv_cache_dtype, self.device,
                                int8=self.kv_int8)  # fmt: skip
        self.blocks = BlockManager(num_blocks, self.block_size, enable_prefix_caching)
        self.max_context = min(self.config.max_position_embeddings, num_blocks * self.block_size)
        self.runner: CudaRunner | None = None
        if self.kernel_path:
            self.runner = CudaRunner(self.model, self.kv_cache, max_batch=max_num_seqs,
                                     max_context=self.max_context, scratch_slot=num_blocks * self.block_size)  # fmt: skip
        # Batch-1 decode of a quantized model on CPU in one C++ call per token (None: modules).
        self.fused_decoder = None if self.kernel_path else FusedDecoder.for_model(self.model, self.kv_cache.data)
        self.num_real_tokens = min(self.tokenizer.vocab_size, self.config.vocab_size)
        self.default_stop_ids = self.tokenizer.stop_token_ids() or list(self.config.eos_token_ids)
        self.stats = RequestStats()  # of the most recent request

    # ----- public API -----

    def generate(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> Completion:
        token_ids: list[int] = []
        text: list[str] = []
        finish_reason = ""
        for output in self.stream(prompt_token_ids, params):
            token_ids += output.token_ids
            text.append(output.text)
            finish_reason = output.finish_reason or finish_reason
        return Completion(token_ids, "".join(text), finish_reason, self.stats)

    def generate_batch(
        self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Several requests at once, decoded together; results in prompt order."""
        all_params = params if isinstance(params, list) else [params] * len(prompts)
        requests = [self._new_request(p, sp) for p, sp in zip(prompts, all_params, strict=True)]
        for _ in self._run(requests):
            pass
        return [
            Completion(r.completion_ids, self.tokenizer.decode(r.completion_ids), r.finish_reason, r.stats)
            for r in requests
        ]

    def stream(self, prompt_token_ids: list[int], params: SamplingParams | None = None) -> Iterator[StreamOutput]:
        """Yields outputs as tokens are produced. Stopping iteration early cancels the request."""
        request = self._new_request(prompt_token_ids, params)  # errors surface here, not mid-stream
        return self._stream(request)

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """float32 logits [len(token_ids), vocab_size] computed by the prefill path, no cache reuse."""
        seq = self._new_request(token_ids, SamplingParams(max_tokens=1)).seq
        if not self.blocks.allocate(seq, use_prefix_cache=False):
            raise ContextOverflow(self._no_room_message(len(seq)))
        try:
            hidden = torch.cat(list(self._prefill_chunks(seq)))
            return self.model.logits(hidden).cpu()
        finally:
            self.blocks.free_sequence(seq)

    # ----- the generation loop -----

    def _stream(self, request: _Request) -> Iterator[StreamOutput]:
        decoder = IncrementalDecoder(self.tokenizer)
        for req, new_ids in self._run([request]):
            text = decoder.add(new_ids)
            if req.finish_reason is not None:
                text += decoder.flush()
            yield StreamOutput(new_ids, text, req.finish_reason)

    @torch.inference_mode()
    def _run(self, requests: list[_Request]) -> Iterator[tuple[_Request, list[int]]]:
        """Runs requests to completion, yielding (request, new token ids) after every step.

        State is settled before each yield, so a consumer that stops at any yield leaves
        nothing behind but cached blocks.
        """
        waiting = deque(requests)
        running: list[_Request] = []
        try:
            while waiting or running:
                if waiting and len(running) < self.max_num_seqs and self._admit(waiting[0]):
                    request = waiting.popleft()
                    running.append(request)
                    new_ids = self._accept(request, request.sampler(self._prefill(request)))
                    self._retire_finished(running)
                    yield request, new_ids
                    continue
                if not running:
                    raise ContextOverflow(self._no_room_message(len(waiting[0].seq)))
                self._make_room(running, waiting)
                if not running:
                    continue
                started = time.perf_counter()
                logits = self._decode_logits(running)
                tokens = [r.sampler(row) for r, row in zip(running, logits)]
                elapsed = time.perf_counter() - started
                outputs = []
                for request, token in zip(running, tokens):
                    request.stats.decode_seconds += elapsed
                    request.stats.decode_tokens += 1
                    outputs.append((request, self._accept(request, token)))
                self._retire_finished(running)
                yield from outputs
        finally:
            for request in running:
                self.blocks.free_sequence(request.seq)

    def _retire_finished(self, running: list[_Request]) -> None:
        for request in [r for r in running if r.finish_reason is not None]:
            running.remove(request)
            self.blocks.free_sequence(request.seq)

    def _admit(self, request: _Request) -> bool:
        self.stats = request.stats
        return self.blocks.allocate(request.seq)

    def _make_room(self, running: list[_Request], waiting: deque[_Request]) -> None:
        """Give every running sequence a slot for its next token, preempting the newest if needed."""
        for request in list(running):
            if request not in running:
                continue
            while not self.blocks.grow(request.seq, len(request.seq)):
                victim = running.pop()  # recomputed later, mostly from the prefix cache
                self.blocks.free_sequence(victim.seq)
                waiting.appendleft(victim)
                if victim is request:
                    break

    def _prefill(self, request: _Request) -> torch.Tensor:
        """Computes the sequence's uncached tokens; returns the last position's logits."""
        seq, stats = request.seq, request.stats
        started = time.perf_counter()
        stats.cached_tokens += seq.num_computed
        stats.prefilled_tokens += len(seq) - seq.num_computed
        *_, hidden = self._prefill_chunks(seq)
        logits = self.model.logits(hidden[-1:])[0]
        if logits.is_cuda:  # GPU work is asynchronous; the sampler would wait for it anyway
            torch.cuda.synchronize(logits.device)
        stats.prefill_seconds += time.perf_counter() - started
        return logits

    def _prefill_chunks(self, seq: Sequence) -> Iterator[torch.Tensor]:
        """Runs the uncached tokens chunk by chunk; yields each chunk's hidden states."""
        while seq.num_computed < len(seq):
            start = seq.num_computed
            end = min(len(seq), start + self.prefill_chunk_tokens)
            if self.runner is not None:
                hidden = self.runner.prefill(seq, start, end)
            else:
                hidden = self._prefill_on_modules(seq, start, end)
            seq.num_computed = end
            self.blocks.commit(seq)
            yield hidden

    def _prefill_on_modules(self, seq: Sequence, start: int, end: int) -> torch.Tensor:
        batch = AttentionBatch(
            positions=torch.arange(start, end, device=self.device),
            write_slots=self._tensor(self.kv_cache.slots(seq, start, end)),
            sequences=[SequenceSlice(slice(0, end - start), start, self.kv_cache.spans(seq, end))],
            expanded=expanded_is_cheaper(self.config, end - start),
            max_score_elements=self.max_score_elements,
        )
        return self.model(self._tensor(seq.token_ids[start:end]), batch, self.kv_cache.data)

    def _decode_logits(self, running: list[_Request]) -> torch.Tensor:
        """Feeds each sequence's last token; returns next-token logits [len(running), vocab]."""
        seqs = [r.seq for r in running]
        if self.runner is not None:
            logits = self.runner.decode(seqs)
        elif self.fused_decoder is not None and len(seqs) == 1:
            (seq,) = seqs
            logits = self.fused_decoder.logits(seq.token_ids[-1], len(seq) - 1, seq.block_table, self.block_size, self.kv_cache.data)
        else:
            logits = self._decode_on_modules(seqs)
        for seq in seqs:
            seq.num_computed = len(seq)
            self.blocks.commit(seq)
        return logits

    def _decode_on_modules(self, seqs: list[Sequence]) -> torch.Tensor:
        batch = AttentionBatch(
            positions=self._tensor([len(s) - 1 for s in seqs]),
            write_slots=self._tensor([self.kv_cache.slots(s, len(s) - 1, len(s))[0] for s in seqs]),
            sequences=[
                SequenceSlice(slice(i, i + 1), len(s) - 1, self.kv_cache.spans(s, len(s), whole_blocks=True))
                for i, s in enumerate(seqs)
            ],
            max_score_elements=self.max_score_elements,
        )
        hidden = self.model(self._tensor([s.token_ids[-1] for s in seqs]), batch, self.kv_cache.data)
        return self.model.logits(hidden)

    def _accept(self, request: _Request, token: int) -> list[int]:
        """Appends a sampled token and decides whether the request is finished."""
        if token in request.stop_ids:
            request.finish_reason = "stop"
            return []
        request.seq.token_ids.append(token)
        if len(request.completion_ids) >= request.params.max_tokens or len(request.seq) >= self.max_context:
            request.finish_reason = "length"
        return [token]

    # ----- helpers -----

    def _new_request(self, prompt_token_ids: list[int], params: SamplingParams | None) -> _Request:
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
        return _Request(
            seq=Sequence(token_ids=prompt, num_prompt_tokens=len(prompt)),
            params=params,
            sampler=Sampler(params, self.num_real_tokens),
            stop_ids=frozenset(stop_ids),
            stats=RequestStats(prompt_tokens=len(prompt)),
        )

    def _no_room_message(self, num_tokens: int) -> str:
        return (
            f"request of {num_tokens} tokens does not fit: the context holds {self.max_context} tokens "
            f"(model limit {self.config.max_position_embeddings}, KV cache "
            f"{self.blocks.num_blocks * self.block_size}); shorten the conversation or give the "
            f"KV cache more memory"
        )

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _plan_num_blocks(self, kv_cache_memory: int | None) -> int:
        """Blocks for the whole model context, or as many as the memory budget allows."""
        per_block = KVCache.bytes_per_block(self.config, self.block_size, self.kv_cache_dtype, int8=self.kv_int8)
        full_context = self.config.max_position_embeddings + self.block_size - 1
        wanted = (full_context + self.block_size - 1) // self.block_size
        budget = kv_cache_memory if kv_cache_memory is not None else self._default_kv_memory()
        num_blocks = min(wanted, budget // per_block)
        if num_blocks < 1:
            raise UsageError(f"kv_cache_memory of {budget} bytes holds no block of {per_block} bytes")
        return num_blocks

    def _default_kv_memory(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return int(free * GPU_KV_MEMORY_FRACTION)
        return int(_available_memory() * CPU_KV_MEMORY_FRACTION)


def _kv_cache_dtype(name: str | None, kernel_path: bool) -> torch.dtype | None:
    """The cache's storage dtype for a kv_cache_dtype option; None means the model's dtype."""
    if name not in (None, "int8", "fp8"):
        raise UsageError(f"unsupported kv_cache_dtype {name!r}; use int8 (CPU), fp8 (CUDA) or leave it unset")
    if name == "fp8" and not kernel_path:
        raise UsageError("kv_cache_dtype='fp8' needs the CUDA kernel path (device='cuda')")
    if name == "int8" and kernel_path:
        raise UsageError("kv_cache_dtype='int8' is for the CPU path; on CUDA use fp8")
    return torch.float8_e4m3fn if name == "fp8" else None


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
