"""The served engine: loading state, the bounded queue, requests in flight, shutdown.

The model loads on a thread while the HTTP side already answers (/health says 503 until it is
ready). A request is admitted only while fewer than `max_num_seqs + max_queue` are in flight
(the engine decodes `max_num_seqs` together; the rest wait in its scheduler); beyond that it is
a 429 with Retry-After. Each admitted request is a `Turn`: its engine request, its response
builder, and a `close` that frees its sequence and its place in the queue, whichever way it ends.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from glmcode.chat_format import render_ids
from glmcode.engine.llm import LLM
from glmcode.errors import GlmcodeError
from glmcode.server.completions import ResponseBuilder
from glmcode.server.engine_bridge import EngineRequest
from glmcode.server.protocol import ApiError, ChatCompletionRequest

LOADING, READY, STOPPING, FAILED = "loading", "ready", "stopping", "failed"
RETRY_AFTER_BUSY = 2  # seconds a client is told to wait when the queue is full
RETRY_AFTER_LOADING = 5


@dataclass(eq=False)  # each turn is its own: hashed by identity
class Turn:
    """One admitted chat completion."""

    service: Service
    builder: ResponseBuilder | None = None
    engine: EngineRequest | None = None
    _closed: bool = field(default=False, repr=False)

    def close(self, reason: str = "client") -> None:
        """Idempotent: cancels the engine request if it still runs, and gives back the slot."""
        if self._closed:
            return
        self._closed = True
        if self.engine is not None:
            self.engine.cancel(reason)
        self.service._release(self)


class Service:
    def __init__(self, *, model_names: list[str], model_dir: str, max_queue: int, max_num_seqs: int):
        self.model_names = model_names  # the first is the one /v1/models lists
        self.model_dir = model_dir
        self.limit = max_num_seqs + max_queue
        self.status = LOADING
        self.llm: LLM | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self.started = int(time.time())
        self.failure: BaseException | None = None  # why loading failed
        self._turns: set[Turn] = set()
        self._lock = threading.Lock()

    @property
    def model(self) -> str:
        return self.model_names[0]

    def ready(self, llm: LLM) -> None:
        self.llm = llm
        self.status = READY

    # ----- requests -----

    def admit(self) -> Turn:
        if self.status != READY:
            raise self._unavailable()
        with self._lock:
            if len(self._turns) >= self.limit:
                raise ApiError(429, f"the server is busy: {len(self._turns)} requests in flight (limit {self.limit}); "
                               "retry later", type="rate_limit_error", code="queue_full",
                               retry_after=RETRY_AFTER_BUSY)  # fmt: skip
            turn = Turn(self)
            self._turns.add(turn)
        return turn

    async def start(self, turn: Turn, request: ChatCompletionRequest) -> None:
        """Render the prompt and start generating; a request that cannot run raises ApiError."""
        llm = self.llm
        if request.model not in self.model_names:
            raise ApiError(404, f"the model '{request.model}' does not exist; this server serves '{self.model}'",
                           code="model_not_found", param="model")  # fmt: skip
        tools, flags = request.template_tools(), request.chat_template_kwargs
        messages = request.template_messages()
        try:
            prompt = await asyncio.to_thread(render_ids, llm.tokenizer, messages, tools,
                                             enable_thinking=flags.enable_thinking, clear_thinking=flags.clear_thinking)  # fmt: skip
        except (GlmcodeError, ValueError, TypeError, KeyError, AttributeError) as error:
            raise ApiError(400, f"cannot render these messages: {error}", param="messages") from None
        room = llm.max_context - len(prompt)
        if room < 1:
            raise ApiError(400, f"This model's maximum context length is {llm.max_context} tokens, but the messages "
                           f"take {len(prompt)} tokens; shorten them", code="context_length_exceeded", param="messages")
        try:
            stream = llm.stream(prompt, request.sampling(room))
        except GlmcodeError as error:
            raise ApiError(400, str(error)) from None
        turn.builder = ResponseBuilder(tools, flags.enable_thinking, request.stop_strings(), len(prompt), request.model)
        turn.engine = EngineRequest(stream, asyncio.get_running_loop()).start()

    def _release(self, turn: Turn) -> None:
        with self._lock:
            self._turns.discard(turn)

    def _unavailable(self) -> ApiError:
        if self.status == LOADING:
            return ApiError(503, "the model is still loading; retry shortly", type="service_unavailable",
                            code="model_loading", retry_after=RETRY_AFTER_LOADING)  # fmt: skip
        return ApiError(503, "the server is shutting down" if self.status == STOPPING else "the model failed to load",
                        type="service_unavailable", code="unavailable")  # fmt: skip

    # ----- what runs -----

    def health(self) -> tuple[int, dict[str, Any]]:
        if self.status != READY:
            return 503, {"status": self.status}
        llm = self.llm
        in_use = sum(1 for block in llm.blocks.blocks if block.ref_count)
        disk = llm.disk_cache
        return 200, {
            "status": READY,
            "model": self.model,
            "max_context": llm.max_context,
            "requests": {"in_flight": len(self._turns), "limit": self.limit},
            "kv_cache": {"blocks": llm.blocks.num_blocks, "in_use": in_use, "block_size": llm.block_size},
            "disk_cache": None if disk is None else {"directory": str(disk.directory), "writable": disk.writable,
                                                     **vars(disk.stats)},  # fmt: skip
        }

    def models(self) -> dict[str, Any]:
        if self.status != READY:
            raise self._unavailable()
        card = {"id": self.model, "object": "model", "created": self.started, "owned_by": "glmcode",
                "root": self.model_dir, "max_model_len": self.llm.max_context}  # fmt: skip
        return {"object": "list", "data": [card]}

    def begin_shutdown(self) -> int:
        """No new requests; the ones in flight are cancelled and end cleanly. Returns how many."""
        self.status = STOPPING
        with self._lock:
            turns = list(self._turns)
        for turn in turns:
            if turn.engine is not None:
                turn.engine.cancel("shutdown")
        return len(turns)

    def close(self) -> None:
        if self.llm is not None:
            self.llm.close()
