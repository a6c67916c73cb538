"""Failures: HTTP errors and business codes, retries, dead servers, cut and stalled streams."""

from __future__ import annotations

import socket
import sys
from dataclasses import replace

import pytest

from glmcode.backends.remote import RemoteBackend, RemoteEndpoint, resolve_endpoint
from glmcode.backends.base import Sampling, Thinking
from glmcode.errors import AuthError, ContextOverflow, ServerError
from glmcode.events import ContentDelta, Error, Finish, Notice, ReasoningDelta, ToolCall
from tests.backends.conftest import FAST, READ_FILE, USER, collect, generic_backend, hosted_backend, of_type, text_of
from tests.fake_glm_server import FakeGlmServer, error, openai_error, reply

RATE_LIMITED = "Rate limit reached for requests"


def test_429_concurrency_then_success_retries_with_a_notice(hosted):
    hosted.play(error(429, RATE_LIMITED, code="1302"), error(429, "too frequent", code="1303"), reply("Finally."))
    events = collect(hosted_backend(hosted))
    notices = of_type(events, Notice)
    assert len(notices) == 2
    assert all(n.message.startswith("rate limited, retrying in ") for n in notices)
    assert "attempt 2 of 5" in notices[0].message and "attempt 3 of 5" in notices[1].message
    assert text_of(events, ContentDelta) == "Finally." and events[-1] == Finish("stop")
    assert len(hosted.bodies) == 3 and hosted.bodies[0] == hosted.bodies[2]


def test_retry_after_is_respected(hosted):
    hosted.play(error(503, "overloaded", code="1305", headers={"Retry-After": "0.3"}), reply("ok"))
    events = collect(hosted_backend(hosted))
    assert of_type(events, Notice)[0].message == "rate limited, retrying in 0.3s (attempt 2 of 5)"
    assert events[-1] == Finish("stop")


def test_server_errors_are_retried_then_fail_with_one_line(hosted):
    hosted.play(*[error(500, "internal error", code="500")] * 3)
    backend = hosted_backend(hosted, max_retries=2)
    events = []
    with pytest.raises(ServerError) as raised:
        for event in backend.stream(USER, [], Thinking(), Sampling()):
            events.append(event)
    assert [n.message.split(",")[0] for n in of_type(events, Notice)] == ["server error (HTTP 500)"] * 2
    message = str(raised.value)
    assert "\n" not in message and "after 3 attempts" in message and "internal error" in message
    assert hosted.remaining == 0


def test_a_rate_limit_that_never_ends_gives_up(hosted):
    hosted.play(*[error(429, RATE_LIMITED, code="1302")] * 2)
    with pytest.raises(ServerError, match="still rate limiting after 2 attempts.*1302"):
        collect(hosted_backend(hosted, max_retries=1))


def test_a_quota_is_not_retried(hosted):
    hosted.play(error(429, "usage cap reached", code="1308"))
    with pytest.raises(ServerError, match="usage cap reached"):
        collect(hosted_backend(hosted))
    assert len(hosted.bodies) == 1


def test_401_names_the_variable_to_set(hosted):
    hosted.play(error(401, "token expired", code="1003"))
    with pytest.raises(AuthError) as raised:
        collect(hosted_backend(hosted))
    assert "rejected the API key" in str(raised.value) and "ZHIPUAI_API_KEY" in str(raised.value)
    assert len(hosted.bodies) == 1  # never retried


def test_a_wrong_key_is_refused_by_the_server_itself(hosted):
    endpoint = RemoteEndpoint("zai", hosted.base_url, "ZAI_API_KEY", hosted=True, api_key="sk-wrong-key-0000")
    with pytest.raises(AuthError, match="ZAI_API_KEY"):
        collect(RemoteBackend(endpoint, **FAST))


def test_a_generic_server_that_wants_a_key():
    with FakeGlmServer(dialect="openai", api_key="sk-local-key") as server:
        with pytest.raises(AuthError, match="requires an API key.*set GLMCODE_API_KEY"):
            collect(generic_backend(server))


def test_1113_means_balance_or_wrong_endpoint(hosted):
    hosted.play(error(429, "余额不足或无可用资源包", code="1113"))
    with pytest.raises(AuthError) as raised:
        collect(hosted_backend(hosted))
    assert "no balance" in str(raised.value) and "another endpoint" in str(raised.value)


def test_other_400_codes_show_the_servers_message(hosted):
    hosted.play(error(400, "Invalid parameter: messages[0].content", code="1214"))
    with pytest.raises(ServerError, match=r"rejected the request \(HTTP 400, code 1214: Invalid parameter: messages\[0\].content\)"):
        collect(hosted_backend(hosted))


@pytest.mark.parametrize("turn", [
    error(400, "Prompt exceeds max length", code="1261"),
    openai_error(400, "This model's maximum context length is 131072 tokens. However, you requested 140000 tokens."),
    openai_error(400, "Input length (140000 tokens) exceeds the maximum allowed length (131072 tokens)."),  # SGLang
    openai_error(400, "the request exceeds the available context size, try increasing it"),  # llama.cpp
])
def test_a_too_long_prompt_is_a_context_overflow(turn):
    with FakeGlmServer(turn, dialect="openai") as server:
        with pytest.raises(ContextOverflow, match="too long for glm-4.7-flash"):
            collect(generic_backend(server))


def test_a_wrong_base_url_says_where_to_look(vllm):
    backend = RemoteBackend(resolve_endpoint(vllm.base_url.removesuffix("/v1"), {}), **FAST)
    with pytest.raises(ServerError, match=r"404.*ends in /v1"):
        collect(backend)


def test_connection_refused_is_one_clear_line():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    backend = RemoteBackend(resolve_endpoint(f"http://127.0.0.1:{port}/v1", {}), **FAST)
    with pytest.raises(ServerError) as raised:
        collect(backend)
    assert str(raised.value) == f"connection refused by 127.0.0.1:{port}: is the server running at http://127.0.0.1:{port}/v1?"


def test_an_unknown_host_is_one_clear_line():
    backend = RemoteBackend(resolve_endpoint("http://no-such-host.invalid:8000/v1", {}), **FAST)
    with pytest.raises(ServerError, match=r"cannot resolve host 'no-such-host.invalid:8000'"):
        collect(backend)


def test_a_server_that_never_answers_the_request_times_out(hosted):
    hosted.play(reply("too late").stall(after=0, seconds=10))
    # The status line is sent, then nothing: the read timeout ends the response.
    events = collect(hosted_backend(hosted, timeout=0.3))
    assert "stalled: nothing received for 0.3s" in of_type(events, Error)[0].message
    assert events[-1] == Finish("error") and of_type(events, ContentDelta) == []


def test_a_stalled_stream_keeps_the_partial_text(hosted):
    hosted.play(reply("The fix is to", reasoning="Let me think.", chunk_size=4).stall(after=5, seconds=10))
    events = collect(hosted_backend(hosted, timeout=0.3))
    assert text_of(events, ReasoningDelta) == "Let me think."
    assert text_of(events, ContentDelta) == "The "
    errors = of_type(events, Error)
    assert len(errors) == 1 and errors[0].details["kind"] == "stalled"
    assert events[-1] == Finish("error")


def test_a_cut_stream_keeps_text_and_never_emits_the_half_received_call(hosted):
    turn = reply("Reading it.", tool_calls=[{"name": "read_file", "arguments": {"path": "src/module.py"}}], fragment_arguments=4)
    hosted.play(turn.cut(after=len(turn.deltas) - 2))
    events = collect(hosted_backend(hosted), tools=[READ_FILE])
    assert text_of(events, ContentDelta) == "Reading it."
    assert of_type(events, ToolCall) == []
    error_event = of_type(events, Error)[0]
    assert error_event.details == {"kind": "cut", "dropped_tool_calls": 1}
    assert "broke in the middle of the response" in error_event.message and "1 unfinished tool call(s) dropped" in error_event.message
    assert events[-1] == Finish("error")


def test_a_stream_that_ends_early_without_a_finish_is_cut(vllm):
    vllm.play(replace(reply("Half"), finish_reason=None, done=False))
    events = collect(generic_backend(vllm))
    assert text_of(events, ContentDelta) == "Half"
    assert "ended before the response was complete" in of_type(events, Error)[0].message
    assert events[-1] == Finish("error")


@pytest.mark.skipif(sys.platform != "linux", reason="relies on Linux dropping connections beyond a full listen backlog")
def test_a_connect_timeout_is_one_clear_line():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        fillers = [socket.socket() for _ in range(4)]  # never accepted: they fill the backlog
        for filler in fillers:
            filler.setblocking(False)
            filler.connect_ex(("127.0.0.1", port))
        backend = RemoteBackend(resolve_endpoint(f"http://127.0.0.1:{port}/v1", {}), **{**FAST, "connect_timeout": 0.3})
        try:
            with pytest.raises(ServerError) as raised:
                collect(backend)
        finally:
            for filler in fillers:
                filler.close()
    assert str(raised.value) == f"timed out connecting to 127.0.0.1:{port} after 0.3s: check the URL and your network"
