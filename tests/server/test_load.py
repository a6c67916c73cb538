"""A bounded load test on loopback: 16 streaming clients at once, some hanging up mid-stream,
among malformed and oversized bodies and wrong keys. The server stays up, every answer that
completes is well-formed, and afterwards every KV block is back in the pool."""

from __future__ import annotations

import json
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")

MODEL = "glm-4.7-flash"
KEY = "sk-load-test-key"
STREAMS = 16
CLIENT_SECONDS = 240


def _stream(base_url: str, index: int, outcomes: dict) -> None:
    client = openai.OpenAI(base_url=base_url, api_key=KEY, max_retries=0, timeout=CLIENT_SECONDS)
    wanted = 16 + index
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": f"request number {index} " * (1 + 8 * index)}],
        max_tokens=wanted, temperature=0.8, seed=index, stream=True, stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )  # fmt: skip
    chunks = []
    for chunk in stream:
        chunks.append(chunk)
        if index % 4 == 3 and len(chunks) == 3:  # every fourth client hangs up mid-stream
            stream.close()
            outcomes[index] = "hung up"
            return
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == wanted
    outcomes[index] = "done"


def _bad(base_url: str, kind: str, outcomes: dict) -> None:
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
    if kind == "malformed":
        response, status = httpx.post(f"{base_url}/chat/completions", content=b'{"model": ', headers=headers), 400
    elif kind == "oversized":
        huge = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "y" * (17 * 2**20)}]})
        response, status = httpx.post(f"{base_url}/chat/completions", content=huge, headers=headers, timeout=60), 413
    else:
        headers["authorization"] = "Bearer not-the-key"
        response, status = httpx.post(f"{base_url}/chat/completions", content=body, headers=headers), 401
    assert response.status_code == status and response.json()["error"]["message"]
    outcomes[kind] = status


def test_sixteen_streaming_clients_with_hang_ups_and_bad_requests(tiny_checkpoint, start_server):
    server = start_server(tiny_checkpoint, env={"GLMCODE_SERVE_API_KEY": KEY})
    outcomes: dict = {}
    failures: list[str] = []

    def guarded(target, *args) -> None:
        try:
            target(*args)
        except Exception as error:  # noqa: BLE001 - collected and reported below
            failures.append(f"{target.__name__}{args[1:2]}: {error!r}")

    jobs = [(_stream, server.base_url, index, outcomes) for index in range(STREAMS)]
    jobs += [(_bad, server.base_url, kind, outcomes) for kind in ("malformed", "oversized", "wrong key") for _ in range(2)]
    threads = [threading.Thread(target=guarded, args=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(CLIENT_SECONDS)
    assert not any(thread.is_alive() for thread in threads), "a client is still waiting"
    assert failures == []
    assert sorted(k for k, v in outcomes.items() if v == "hung up") == [3, 7, 11, 15]
    assert sum(1 for v in outcomes.values() if v == "done") == 12

    health = server.wait_idle()
    assert health["kv_cache"]["in_use"] == 0 and health["requests"]["in_flight"] == 0
    assert server.proc.poll() is None
    after = openai.OpenAI(base_url=server.base_url, api_key=KEY, max_retries=0)
    assert after.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still up?"}], max_tokens=2).choices
