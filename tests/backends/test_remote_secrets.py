"""The API key never shows up in anything the backend produces, even when a server echoes it."""

from __future__ import annotations

import json
import logging
import socket
import traceback

import pytest

from glmcode.backends.base import Sampling, Thinking
from glmcode.backends.remote import RemoteBackend, RemoteEndpoint, resolve_endpoint
from glmcode.errors import GlmcodeError
from tests.backends.conftest import FAST, KEY, READ_FILE, USER, hosted_backend
from tests.fake_glm_server import FakeGlmServer, Turn, error, reply


def _everything_said(backend: RemoteBackend, tools=()) -> list[str]:
    """Every string a run produces: event reprs, or the error's str, repr and traceback."""
    said = []
    try:
        for event in backend.stream(USER, list(tools), Thinking(), Sampling()):
            said.append(repr(event))
    except GlmcodeError as exc:
        said += [str(exc), repr(exc), "".join(traceback.format_exception(exc))]
    return said


def test_the_key_never_leaks_on_any_path(hosted, caplog):
    caplog.set_level(logging.DEBUG)
    echo = f"invalid api key {KEY} for this request"
    hosted.play(
        error(401, echo, code="1001"),
        error(400, echo, code="1214"),
        error(429, echo, code="1113"),
        *[error(500, echo, code="500")] * 2,
        error(429, echo, code="1302"), reply("fine", reasoning="ok"),
        Turn(deltas=({"content": "partial"},), payloads=(json.dumps({"error": {"message": echo}}),), finish_reason=None, done=False),
        reply("cut", tool_calls=[{"name": "read_file", "arguments": {"path": KEY}}]).cut(after=1),
        reply("stalled").stall(after=1, seconds=5),
        reply(tool_calls=[{"name": "read_file", "arguments": {"path": "a.py"}}]),
    )
    backend = hosted_backend(hosted, max_retries=1, timeout=0.3)
    said = []
    for _ in range(9):
        said += _everything_said(backend, tools=[READ_FILE])
    assert hosted.remaining == 0
    assert all(request.headers["authorization"] == f"Bearer {KEY}" for request in hosted.requests)  # it was really sent

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    said += _everything_said(RemoteBackend(resolve_endpoint(dead, {"GLMCODE_API_KEY": KEY}), **FAST))
    said += [repr(backend), backend.name, repr(backend.endpoint), str(backend.endpoint)]
    said += [record.getMessage() for record in caplog.records]

    assert any("***" in text for text in said)  # the echoed key was there, and was masked
    leaks = [text for text in said if KEY in text]
    assert leaks == []


def test_an_error_from_a_generic_server_masks_the_key_too():
    with FakeGlmServer(error(403, f"key {KEY} has no access to this model"), dialect="openai") as server:
        endpoint = RemoteEndpoint("custom", server.base_url, "GLMCODE_API_KEY", hosted=False, api_key=KEY)
        with pytest.raises(GlmcodeError) as raised:
            list(RemoteBackend(endpoint, **FAST).stream(USER, [], Thinking(), Sampling()))
    assert KEY not in str(raised.value) and "key *** has no access" in str(raised.value)
