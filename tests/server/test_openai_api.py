"""The OpenAI chat API of `glmcode serve`, spoken by the official `openai` SDK, on the tiny checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import pytest

from tests.conftest import load_tiny_checkpoint_writer
from tests.server.conftest import slow_to_load_checkpoint

openai = pytest.importorskip("openai")

MODEL = "glm-4.7-flash"
HI = [{"role": "user", "content": "hi"}]
# Longer than two of the engine's 256-token blocks with the tiny tokenizer.
LONG = [{"role": "system", "content": "You are a careful reviewer. " * 120}, {"role": "user", "content": "Review."}]


def test_a_whole_answer_has_the_openai_shape(client):
    answer = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=8, temperature=0)
    assert answer.object == "chat.completion" and answer.model == MODEL and answer.id.startswith("chatcmpl-")
    choice = answer.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length", "tool_calls")
    assert answer.usage.prompt_tokens > 0 and 0 < answer.usage.completion_tokens <= 8
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    assert answer.usage.prompt_tokens_details.cached_tokens == 0


def test_a_streamed_answer_equals_the_whole_one(client):
    params = {"model": MODEL, "messages": HI, "max_tokens": 12, "temperature": 0, "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**params).choices[0].message
    chunks = list(client.chat.completions.create(**params, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = {"content": "", "reasoning_content": ""}
    for chunk in chunks[:-1]:
        delta = chunk.choices[0].delta
        text["content"] += delta.content or ""
        text["reasoning_content"] += getattr(delta, "reasoning_content", None) or ""
    assert text["content"] == (whole.content or "") and text["reasoning_content"] == (getattr(whole, "reasoning_content", None) or "")
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_the_second_request_with_the_same_prefix_reports_cached_tokens(client):
    first = client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=2)
    second = client.chat.completions.create(model=MODEL, messages=LONG + [{"role": "user", "content": "Again."}], max_tokens=2)
    assert first.usage.prompt_tokens > 512
    assert second.usage.prompt_tokens_details.cached_tokens >= 512


def test_sampling_parameters_are_honoured(client):
    def sample(extra: dict | None = None, **params):
        return client.chat.completions.create(model=MODEL, messages=HI, max_tokens=16,
                                              extra_body={"ignore_eos": True, **(extra or {})}, **params).choices[0].message

    seeded = [sample({"top_k": 50, "min_p": 0.01}, temperature=1.0, top_p=0.9, seed=7) for _ in range(2)]
    assert seeded[0].content == seeded[1].content and seeded[0].reasoning_content == seeded[1].reasoning_content
    greedy = sample(temperature=0)
    text = (greedy.reasoning_content or "") + (greedy.content or "")
    stop = text[3:6]
    if stop.strip():
        cut = sample(temperature=0, stop=[stop])
        assert stop not in ((cut.reasoning_content or "") + (cut.content or ""))


def test_models_and_health(server, client):
    models = client.models.list().data
    assert [model.id for model in models] == [MODEL] and models[0].max_model_len == 4096
    status, health = server.health()
    assert status == 200 and health["status"] == "ready" and health["max_context"] == 4096


# --- the error matrix --------------------------------------------------------------------------

def _post(server, body, **kwargs) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(f"{server.base_url}/chat/completions", content=content,
                      headers={"content-type": "application/json", **kwargs.pop("headers", {})},
                      timeout=kwargs.pop("timeout", 60))  # fmt: skip


def _assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and "type" in error
    if code is not None:
        assert error["code"] == code
    return error


@pytest.mark.parametrize(("body", "where"), [
    (b"{not json", None),
    ({"model": MODEL}, "messages"),
    ({"model": MODEL, "messages": []}, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"model": MODEL, "messages": HI, "temperature": 3}, "temperature"),
    ({"model": MODEL, "messages": HI, "n": 2}, "n"),
    ({"model": MODEL, "messages": HI, "tool_choice": "required"}, "tool_choice"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content"),
])  # fmt: skip
def test_a_bad_body_is_a_400_naming_the_field(server, body, where):
    error = _assert_openai_error(_post(server, body), 400)
    if where:
        assert error["message"].startswith(where), error


def test_a_prompt_over_the_context_is_a_400_the_clients_recognise(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 5000}])
    assert raised.value.code == "context_length_exceeded" and "maximum context length" in str(raised.value)


def test_an_unknown_model_or_path_is_a_404(server, client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-5", messages=HI)
    assert raised.value.code == "model_not_found"
    _assert_openai_error(httpx.get(f"{server.base_url}/completions-of-old", timeout=10), 404)


def test_a_body_over_the_limit_is_a_413(server):
    huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * (17 * 2**20)}]})
    _assert_openai_error(_post(server, huge), 413, "request_too_large")


def test_a_missing_or_wrong_key_is_a_401(tiny_checkpoint, start_server):
    keyed = start_server(tiny_checkpoint, env={"GLMCODE_SERVE_API_KEY": "sk-local-test-key"})
    for headers in ({}, {"authorization": "Bearer wrong"}):
        _assert_openai_error(_post(keyed, {"model": MODEL, "messages": HI}, headers=headers), 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=keyed.base_url, api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=keyed.base_url, api_key="sk-local-test-key", max_retries=0)
    assert good.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices
    assert keyed.health()[0] == 200  # a load balancer's probe needs no key
    assert "sk-local-test-key" not in "\n".join(keyed.lines) + "".join(p.read_text() for p in keyed.state_files())


def test_a_full_queue_is_a_429_with_retry_after(tiny_checkpoint, start_server):
    small = start_server(tiny_checkpoint, "--max-num-seqs", "1", "--max-queue", "0")
    client = openai.OpenAI(base_url=small.base_url, api_key="unused", max_retries=0)
    held = client.chat.completions.create(model=MODEL, messages=HI, max_tokens=3000, stream=True,
                                          extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(held))
    response = _post(small, {"model": MODEL, "messages": HI, "max_tokens": 2})
    _assert_openai_error(response, 429, "queue_full")
    assert int(response.headers["retry-after"]) >= 1
    held.close()
    small.wait_idle()
    assert client.chat.completions.create(model=MODEL, messages=HI, max_tokens=2).choices


def test_while_the_model_loads_health_and_requests_are_503(tmp_path, start_server):
    slow = slow_to_load_checkpoint(tmp_path / "slow-to-load")
    loading = start_server(slow, "--quantization", "int4", wait=False)
    status, health = loading.health()
    assert status == 503 and health["status"] == "loading"
    response = _post(loading, {"model": MODEL, "messages": HI})
    _assert_openai_error(response, 503, "model_loading")
    assert int(response.headers["retry-after"]) >= 1
    loading.expect("ready:")
    assert loading.health()[0] == 200


def test_a_client_that_goes_away_frees_its_sequence(server, client):
    stream = client.chat.completions.create(model=MODEL, messages=LONG, max_tokens=3000, stream=True,
                                            extra_body={"ignore_eos": True})  # fmt: skip
    next(iter(stream))
    assert server.health()[1]["kv_cache"]["in_use"] > 0
    stream.close()
    server.wait_idle(timeout=20)

    # A whole (non-streamed) answer the client stops waiting for is freed too.
    def abandon() -> None:
        with pytest.raises(httpx.ReadTimeout):
            _post(server, {"model": MODEL, "messages": LONG, "max_tokens": 3000, "ignore_eos": True}, timeout=1.5)

    waiter = threading.Thread(target=abandon)
    waiter.start()
    waiter.join()
    server.wait_idle(timeout=20)


def test_glmcode_itself_uses_it_through_remote(start_server, tmp_path):
    from glmcode.console import validate_event
    from tests.cli.conftest import clean_env

    # glmcode's own prompt (rules, tool specs) is longer than 4096 tokens of the tiny tokenizer.
    roomy = load_tiny_checkpoint_writer().make_tiny_checkpoint(tmp_path / "roomy", max_position_embeddings=16384)
    server = start_server(roomy)
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "glmcode", "ask", "hi", "--remote", server.base_url, "-o", "json", "--max-turns", "1"],
        env=clean_env(home, GLMCODE_MAX_OUTPUT_TOKENS="16", GLMCODE_TEMPERATURE="0"), cwd=work,
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    record = json.loads(result.stdout)
    assert validate_event(record) == [] and record["status"] in ("done", "limit"), record["error"]
    assert record["usage"]["prompt_tokens"] > 500 and 0 < record["usage"]["completion_tokens"] <= 16
