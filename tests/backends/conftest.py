"""Shared helpers: a fake hosted API and a fake vLLM server on 127.0.0.1, fast backends."""

from __future__ import annotations

import threading
from typing import Any, Iterator

import pytest

from glmcode.backends.base import Sampling, Thinking
from glmcode.backends.remote import RemoteBackend, RemoteEndpoint
from glmcode.events import Event
from tests.fake_glm_server import FakeGlmServer

KEY = "sk-test-SECRET123"
USER = [{"role": "user", "content": "hello"}]
# Tiny timeouts and backoff keep the failure tests fast.
FAST = {"timeout": 1.0, "connect_timeout": 1.0, "retry_delay": 0.01, "max_retry_delay": 0.05}

READ_FILE = {
    "type": "function",
    "function": {
        "name": "read_file",
        "description": "Read a file",
        "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]},
    },
}
RUN_TESTS = {
    "type": "function",
    "function": {"name": "run_tests", "description": "Run the tests", "parameters": {"type": "object", "properties": {}}},
}


@pytest.fixture
def hosted() -> Iterator[FakeGlmServer]:
    """A fake Zhipu API; every request body must pass its checks."""
    with FakeGlmServer(dialect="hosted", api_key=KEY, base_path="/api/paas/v4") as server:
        yield server
    assert server.violations == []


@pytest.fixture
def vllm() -> Iterator[FakeGlmServer]:
    """A fake vLLM server (no key, OpenAI flavour)."""
    with FakeGlmServer(dialect="openai") as server:
        yield server
    assert server.violations == []


def hosted_backend(server: FakeGlmServer, **options: Any) -> RemoteBackend:
    endpoint = RemoteEndpoint("zhipu", server.base_url, "ZHIPUAI_API_KEY", hosted=True, api_key=KEY)
    return RemoteBackend(endpoint, **{**FAST, **options})


def generic_backend(server: FakeGlmServer, key: str | None = None, **options: Any) -> RemoteBackend:
    endpoint = RemoteEndpoint("custom", server.base_url, "GLMCODE_API_KEY", hosted=False, api_key=key)
    return RemoteBackend(endpoint, **{**FAST, **options})


def collect(
    backend: RemoteBackend,
    messages: list[dict[str, Any]] = USER,
    tools: list[dict[str, Any]] = (),  # type: ignore[assignment]
    thinking: Thinking = Thinking(),
    sampling: Sampling = Sampling(),
    cancel: threading.Event | None = None,
) -> list[Event]:
    return list(backend.stream(messages, list(tools), thinking, sampling, cancel))


def text_of(events: list[Event], kind: type) -> str:
    return "".join(event.text for event in events if isinstance(event, kind))


def of_type(events: list[Event], kind: type) -> list[Any]:
    return [event for event in events if isinstance(event, kind)]
