"""RemoteBackend: the Backend protocol over an OpenAI-compatible chat-completions API.

One `stream()` call is one POST with `stream: true`: wait for a free slot (per-endpoint
concurrency limit), send, retry rate limits and server errors with backoff, then turn the SSE
body into Events. Failures before the response starts raise one GlmcodeError line; once a 200
response has begun, a failure ends it with Error + Finish("error") and the text already
streamed stays valid.
"""

from __future__ import annotations

import json
import random
import threading
from dataclasses import dataclass
from typing import Any, Generator, Iterator

import httpx

from glmcode.backends.base import Sampling, Thinking
from glmcode.backends.remote.endpoint import RemoteEndpoint
from glmcode.backends.remote.failures import exception_summary, failure_error, parse_failure, transport_error
from glmcode.backends.remote.request import build_request
from glmcode.backends.remote.stream import DONE, SseDecoder, StreamAssembler
from glmcode.backends.remote.transport import CANCELLED, END, POLL_SECONDS, Opened, StreamingPost
from glmcode.events import Event, Finish, Notice
from glmcode.options import ZAI

DEFAULT_MODEL = "glm-4.7-flash"
HOSTED_CONTEXT_WINDOW = 200_000
GENERIC_CONTEXT_WINDOW = 131_072


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with jitter for rate limits and 5xx; a Retry-After header wins."""

    max_retries: int = 4
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delay(self, retry: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        backoff = min(self.max_delay, self.base_delay * 2 ** (retry - 1))
        return backoff * random.uniform(0.5, 1.0)


class RemoteBackend:
    """A model behind an HTTP API: the hosted GLM API or a vLLM / SGLang / llama.cpp server.

    timeout: seconds without a byte from the server before a read gives up (a stalled stream);
    connect_timeout: seconds to open the connection. concurrency: requests in flight per
    endpoint and model, across all backends of the process; None means 1 for the hosted API
    (its free tier allows one) and no limit for other servers; 0 means no limit.
    """

    def __init__(
        self,
        endpoint: RemoteEndpoint,
        *,
        model: str = DEFAULT_MODEL,
        timeout: float = 300.0,
        connect_timeout: float = 10.0,
        max_retries: int = 4,
        retry_delay: float = 1.0,
        max_retry_delay: float = 30.0,
        concurrency: int | None = None,
        context_window: int | None = None,
    ) -> None:
        self.endpoint = endpoint
        self.model = model
        self.name = f"{model} @ {endpoint.label}"
        self.context_window = context_window or (HOSTED_CONTEXT_WINDOW if endpoint.hosted else GENERIC_CONTEXT_WINDOW)
        self.retry = RetryPolicy(max_retries, retry_delay, max_retry_delay)
        self._timeout = timeout
        self._connect_timeout = connect_timeout
        limit = concurrency if concurrency is not None else (1 if endpoint.hosted else 0)
        self.concurrency = limit
        self._slots = _endpoint_slots(endpoint.base_url, model, limit)
        self._client = httpx.Client(timeout=httpx.Timeout(timeout, connect=connect_timeout))

    def stream(
        self,
        messages: list[dict[str, Any]],
        tools: list[dict[str, Any]],
        thinking: Thinking,
        sampling: Sampling,
        cancel: threading.Event | None = None,
    ) -> Iterator[Event]:
        cancel = cancel or threading.Event()
        body = build_request(self.model, messages, tools, thinking, sampling, hosted=self.endpoint.hosted)
        if not (yield from self._take_slot(cancel)):
            yield Finish("cancelled")
            return
        try:
            yield from self._stream_with_retries(body, tools, thinking, cancel)
        finally:
            if self._slots is not None:
                self._slots.release()

    def count_tokens(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> int | None:
        return None  # the server reports exact prompt sizes in Usage events

    def probe_context_window(self) -> int | None:
        """The served context length from GET /models (vLLM: `max_model_len`), if the server says."""
        try:
            response = self._client.get(f"{self.endpoint.base_url}/models", headers=self._headers())
            models = response.json().get("data", []) if response.status_code == 200 else []
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        for entry in models:
            if isinstance(entry, dict) and entry.get("id") == self.model and isinstance(entry.get("max_model_len"), int):
                return entry["max_model_len"]
        return None

    def close(self) -> None:
        self._client.close()

    def _take_slot(self, cancel: threading.Event) -> Generator[Event, None, bool]:
        if self._slots is None or self._slots.acquire(blocking=False):
            return True
        yield Notice(f"waiting for another request to {self.endpoint.label} to finish (concurrency limit {self.concurrency})")
        while not cancel.is_set():
            if self._slots.acquire(timeout=POLL_SECONDS):
                return True
        return False

    def _stream_with_retries(
        self, body: dict[str, Any], tools: list[dict[str, Any]], thinking: Thinking, cancel: threading.Event
    ) -> Iterator[Event]:
        attempt = 1
        while True:
            if cancel.is_set():
                yield Finish("cancelled")
                return
            post = StreamingPost(self._client, self.endpoint.chat_url, body, self._headers())
            try:
                opened = post.next(cancel)
                if opened is CANCELLED:
                    yield Finish("cancelled")
                    return
                if isinstance(opened, Exception):
                    raise self._transport_error(opened) from None
                assert isinstance(opened, Opened)
                if opened.status == 200 and not opened.body:
                    yield from self._read_response(post, tools, thinking, cancel)
                    return
                whole = _decode_chunk(opened.body) if opened.status == 200 else None
                if whole is not None and not whole.get("error"):
                    yield from self._whole_response(whole, tools, thinking)
                    return
                failure = parse_failure(opened.status, opened.headers, opened.body, self.endpoint.api_key)
                if not failure.retryable or attempt > self.retry.max_retries:
                    raise failure_error(failure, self.endpoint, self.model, attempt) from None
            finally:
                post.close()
            delay = self.retry.delay(attempt, failure.retry_after)
            cause = "rate limited" if failure.rate_limited else f"server error (HTTP {failure.status})"
            yield Notice(f"{cause}, retrying in {_seconds(delay)} (attempt {attempt + 1} of {self.retry.max_retries + 1})")
            if cancel.wait(delay):
                yield Finish("cancelled")
                return
            attempt += 1

    def _read_response(
        self, post: StreamingPost, tools: list[dict[str, Any]], thinking: Thinking, cancel: threading.Event
    ) -> Iterator[Event]:
        assembler = StreamAssembler(tools, thinking=thinking.enabled, detect_raw_tags=not self.endpoint.hosted)
        host = self.endpoint.label
        try:
            for data in _sse_payloads(post, cancel):
                if data.strip() == DONE:
                    yield from assembler.finish()
                    return
                chunk = _decode_chunk(data)
                if chunk is None:
                    yield from assembler.abort(f"{host} sent data that is not a chat-completion chunk", "protocol")
                    return
                if chunk.get("error") and not chunk.get("choices"):
                    failure = parse_failure(200, {}, data, self.endpoint.api_key)
                    yield from assembler.abort(f"{host} reported an error in the middle of the response ({failure.message})", "server_error")
                    return
                yield from assembler.feed(chunk)
        except _Cancelled:
            yield Finish("cancelled")
            return
        except httpx.ReadTimeout:
            yield from assembler.abort(f"the response from {host} stalled: nothing received for {self._timeout:g}s (read timeout)", "stalled")
            return
        except httpx.RequestError as exc:
            detail = exception_summary(exc, self.endpoint.api_key)
            yield from assembler.abort(f"the connection to {host} broke in the middle of the response ({detail})", "cut")
            return
        if assembler.finish_reason is not None:  # some servers omit [DONE]
            yield from assembler.finish()
        else:
            yield from assembler.abort(f"the stream from {host} ended before the response was complete", "cut")

    def _whole_response(self, reply: dict[str, Any], tools: list[dict[str, Any]], thinking: Thinking) -> Iterator[Event]:
        """A non-streamed completion (a server that ignored `stream: true`) as one big chunk."""
        assembler = StreamAssembler(tools, thinking=thinking.enabled, detect_raw_tags=not self.endpoint.hosted)
        choices = [{**choice, "delta": choice.get("message") or {}} for choice in reply.get("choices") or []]
        yield from assembler.feed({"choices": choices, "usage": reply.get("usage")})
        yield from assembler.finish()

    def _transport_error(self, exc: Exception) -> Exception:
        if not isinstance(exc, httpx.RequestError):
            return exc  # a bug, not a network problem: let it surface as is
        return transport_error(exc, self.endpoint, connect_timeout=self._connect_timeout, read_timeout=self._timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Accept": "text/event-stream"}
        if self.endpoint.api_key:
            headers["Authorization"] = f"Bearer {self.endpoint.api_key}"
        if self.endpoint.name == ZAI:
            headers["Accept-Language"] = "en-US,en"
        return headers


class _Cancelled(Exception):
    pass


def _decode_chunk(data: str) -> dict[str, Any] | None:
    try:
        chunk = json.loads(data)
    except ValueError:
        return None
    return chunk if isinstance(chunk, dict) else None


def _sse_payloads(post: StreamingPost, cancel: threading.Event) -> Iterator[str]:
    """The data of each server-sent event until the body ends; raises the transport's errors."""
    decoder = SseDecoder()
    while True:
        item = post.next(cancel)
        if item is CANCELLED:
            raise _Cancelled
        if isinstance(item, Exception):
            raise item
        if item is END:
            data = decoder.flush()
            if data is not None:
                yield data
            return
        data = decoder.feed_line(item)  # type: ignore[arg-type]
        if data is not None:
            yield data


_SLOTS: dict[tuple[str, str, int], threading.BoundedSemaphore] = {}
_SLOTS_LOCK = threading.Lock()


def _endpoint_slots(base_url: str, model: str, limit: int) -> threading.BoundedSemaphore | None:
    """One semaphore per endpoint, model and limit, shared by every backend in the process."""
    if limit <= 0:
        return None
    with _SLOTS_LOCK:
        return _SLOTS.setdefault((base_url, model, limit), threading.BoundedSemaphore(limit))


def _seconds(delay: float) -> str:
    return f"{delay:.0f}s" if delay >= 10 else f"{delay:.1f}s".replace(".0s", "s")
