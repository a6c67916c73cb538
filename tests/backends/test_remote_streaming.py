"""Streaming answers from a real HTTP server on 127.0.0.1, and the request bodies it received."""

from __future__ import annotations

import json
from dataclasses import replace

from glmcode.backends.base import Sampling, Thinking
from glmcode.events import ContentDelta, Error, Finish, Notice, ReasoningDelta, ToolCall, ToolCallError, Usage
from tests.backends.conftest import KEY, READ_FILE, RUN_TESTS, USER, collect, generic_backend, hosted_backend, of_type, text_of
from tests.fake_glm_server import Turn, reply

AGENT_HISTORY = [
    {"role": "system", "content": "You are a coding agent.", "name": "policy"},
    {"role": "user", "content": "Fix the failing test."},
    {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Read the test first.",
        "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "read_file", "arguments": {"path": "tests/test_x.py"}}}],
    },
    {"role": "tool", "tool_call_id": "call_a", "content": "def test_x(): assert add(1, 2) == 3"},
]


def test_plain_answer_streams_content_usage_and_finish(hosted):
    hosted.play(reply("The answer is 4.", chunk_size=3, usage={"prompt_tokens": 11, "completion_tokens": 5,
                                                              "total_tokens": 16, "prompt_tokens_details": {"cached_tokens": 8}}))
    backend = hosted_backend(hosted)
    events = collect(backend, thinking=Thinking(enabled=False))
    deltas = of_type(events, ContentDelta)
    assert [d.text for d in deltas] == ["The", " an", "swe", "r i", "s 4", "."]
    assert events[-2:] == [Usage(prompt_tokens=11, completion_tokens=5, cached_tokens=8), Finish("stop")]
    request = hosted.requests[0]
    assert request.path == "/api/paas/v4/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "glm-4.7-flash" and body["stream"] is True
    assert body["messages"] == USER
    assert body["thinking"] == {"type": "disabled", "clear_thinking": False}
    assert "tools" not in body and "tool_stream" not in body
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.7, 1.0, 16384)


def test_reasoning_then_answer(hosted):
    hosted.play(reply("Four.", reasoning="Two plus two is four."))
    events = collect(hosted_backend(hosted))
    assert text_of(events, ReasoningDelta) == "Two plus two is four."
    assert text_of(events, ContentDelta) == "Four."
    kinds = [type(event) for event in events]
    assert kinds.index(ContentDelta) > max(i for i, kind in enumerate(kinds) if kind is ReasoningDelta)
    assert hosted.bodies[0]["thinking"] == {"type": "enabled", "clear_thinking": False}


def test_a_whole_tool_call(hosted):
    hosted.play(reply(reasoning="Look at the file.", tool_calls=[{"name": "read_file", "arguments": {"path": "src/a.py"}, "id": "call_7"}]))
    events = collect(hosted_backend(hosted), tools=[READ_FILE])
    calls = of_type(events, ToolCall)
    assert calls == [ToolCall(name="read_file", arguments={"path": "src/a.py"}, raw='{"path": "src/a.py"}', id="call_7")]
    assert events[-1] == Finish("tool_calls")
    assert events.index(calls[0]) > max(i for i, e in enumerate(events) if isinstance(e, ReasoningDelta))
    body = hosted.bodies[0]
    assert body["tools"] == [READ_FILE] and body["tool_choice"] == "auto" and body["tool_stream"] is True


def test_a_fragmented_tool_call_is_assembled_and_emitted_once_complete(hosted):
    arguments = {"path": "src/ünïcode.py", "start": 10, "lines": [1, 2]}
    hosted.play(reply(tool_calls=[{"name": "read_file", "arguments": arguments}], fragment_arguments=3))
    events = collect(hosted_backend(hosted), tools=[READ_FILE])
    assert [(c.name, c.arguments, c.id) for c in of_type(events, ToolCall)] == [("read_file", arguments, "call_fake_0")]
    assert of_type(events, ToolCallError) == []


def test_two_calls_in_one_message_keep_their_order_and_ids(hosted):
    calls = [{"name": "read_file", "arguments": {"path": "a.py"}, "id": "call_1"}, {"name": "run_tests", "arguments": {}, "id": "call_2"}]
    hosted.play(reply("Checking both.", tool_calls=calls), reply(tool_calls=calls, fragment_arguments=2))
    backend = hosted_backend(hosted)
    for _ in range(2):  # whole, then fragmented with interleaved indexes
        events = collect(backend, tools=[READ_FILE, RUN_TESTS])
        assert [(c.name, c.arguments, c.id) for c in of_type(events, ToolCall)] == [
            ("read_file", {"path": "a.py"}, "call_1"), ("run_tests", {}, "call_2")]
        assert events[-1] == Finish("tool_calls")


def test_invalid_arguments_become_a_tool_call_error_with_the_raw_text(hosted):
    hosted.play(reply(tool_calls=[{"name": "read_file", "arguments": '{"path": "a.py"'}]),
                reply(tool_calls=[{"name": "read_file", "arguments": '["a.py"]'}]))
    backend = hosted_backend(hosted)
    broken = of_type(collect(backend, tools=[READ_FILE]), ToolCallError)
    assert len(broken) == 1 and broken[0].raw == '{"path": "a.py"' and broken[0].name == "read_file"
    assert "not valid JSON" in broken[0].message
    not_object = of_type(collect(backend, tools=[READ_FILE]), ToolCallError)
    assert "must be a JSON object" in not_object[0].message


def test_a_call_cut_by_max_tokens_says_so(hosted):
    hosted.play(reply(tool_calls=[{"name": "read_file", "arguments": '{"pa'}], finish_reason="length"))
    events = collect(hosted_backend(hosted), tools=[READ_FILE])
    assert "max_tokens" in of_type(events, ToolCallError)[0].message
    assert of_type(events, ToolCall) == []


def test_the_agent_history_goes_out_in_wire_form(hosted):
    hosted.play(reply("Fixed."))
    collect(hosted_backend(hosted), messages=AGENT_HISTORY, tools=[READ_FILE], thinking=Thinking(clear_thinking=None),
            sampling=Sampling(temperature=1.0, top_p=0.95, max_tokens=200_000, top_k=40, seed=3))
    body = hosted.bodies[0]
    assert body["messages"] == [
        {"role": "system", "content": "You are a coding agent."},  # 'name' is stripped for the hosted API
        {"role": "user", "content": "Fix the failing test."},
        {"role": "assistant", "content": "", "reasoning_content": "Read the test first.",
         "tool_calls": [{"id": "call_a", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "tests/test_x.py"}'}}]},
        {"role": "tool", "tool_call_id": "call_a", "content": "def test_x(): assert add(1, 2) == 3"},
    ]
    assert body["thinking"] == {"type": "enabled"}
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (1.0, 0.95, 131072)


def test_greedy_sampling_on_the_hosted_api_turns_sampling_off(hosted):
    hosted.play(reply("ok"))
    collect(hosted_backend(hosted), sampling=Sampling(temperature=0.0))
    body = hosted.bodies[0]
    assert body["do_sample"] is False and "temperature" not in body and "top_p" not in body


def test_a_generic_server_gets_template_kwargs_and_its_own_sampling_fields(vllm):
    vllm.play(reply("Hi.", reasoning="Say hi."))
    backend = generic_backend(vllm)
    events = collect(backend, messages=AGENT_HISTORY, tools=[READ_FILE], thinking=Thinking(enabled=True, clear_thinking=True),
                     sampling=Sampling(temperature=0.0, top_k=20, min_p=0.01, seed=7, max_tokens=1000))
    assert text_of(events, ReasoningDelta) == "Say hi." and text_of(events, ContentDelta) == "Hi."
    assert events[-2:] == [Usage(21, 9, 0), Finish("stop")]  # usage from the include_usage chunk
    body = vllm.bodies[0]
    assert body["chat_template_kwargs"] == {"enable_thinking": True, "clear_thinking": True}
    assert body["stream_options"] == {"include_usage": True}
    assert (body["temperature"], body["top_k"], body["min_p"], body["seed"], body["max_tokens"]) == (0.0, 20, 0.01, 7, 1000)
    assert "authorization" not in vllm.requests[0].headers
    assert body["messages"][0].get("name") is None


def test_the_newer_vllm_reasoning_field_name(vllm):
    vllm.reasoning_field = "reasoning"
    vllm.play(reply("Done.", reasoning="Think."))
    events = collect(generic_backend(vllm))
    assert text_of(events, ReasoningDelta) == "Think." and text_of(events, ContentDelta) == "Done."


def test_history_without_ids_gets_matching_ids(vllm):
    history = [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"function": {"name": "read_file", "arguments": {"path": "a"}}},
            {"function": {"name": "read_file", "arguments": '{"path": "b"}'}}]},
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
    ]
    vllm.play(reply("ok"))
    collect(generic_backend(vllm), messages=history, tools=[READ_FILE])
    sent = vllm.bodies[0]["messages"]
    ids = [call["id"] for call in sent[1]["tool_calls"]]
    assert len(set(ids)) == 2 and all(ids)
    assert [sent[2]["tool_call_id"], sent[3]["tool_call_id"]] == ids
    assert [json.loads(call["function"]["arguments"]) for call in sent[1]["tool_calls"]] == [{"path": "a"}, {"path": "b"}]


def test_a_stream_without_done_but_with_a_finish_reason_is_complete(vllm):
    vllm.play(replace(reply("All good."), done=False))
    events = collect(generic_backend(vllm))
    assert text_of(events, ContentDelta) == "All good." and events[-1] == Finish("stop")


def test_a_content_filter_stop_is_an_error_not_an_answer(hosted):
    hosted.play(reply("Partial", finish_reason="sensitive"))
    events = collect(hosted_backend(hosted))
    assert text_of(events, ContentDelta) == "Partial"
    assert "content filter" in of_type(events, Error)[0].message and events[-1] == Finish("error")


def test_an_error_object_in_the_middle_of_the_stream(vllm):
    turn = replace(reply("Half an ans"), payloads=(json.dumps({"error": {"message": "engine died", "code": 500}}),),
                   finish_reason=None, done=False)
    vllm.play(turn)
    events = collect(generic_backend(vllm))
    assert text_of(events, ContentDelta) == "Half an ans"
    assert "engine died" in of_type(events, Error)[0].message and events[-1] == Finish("error")


def test_garbage_data_ends_the_stream_with_an_error(vllm):
    vllm.play(Turn(deltas=({"content": "x"},), payloads=("{not json",), finish_reason=None, done=False))
    events = collect(generic_backend(vllm))
    assert text_of(events, ContentDelta) == "x"
    assert of_type(events, Error)[0].details["kind"] == "protocol" and events[-1] == Finish("error")


def test_a_server_that_ignores_stream_true_still_works(vllm):
    completion = {"id": "x", "object": "chat.completion", "model": "glm-4.7-flash",
                  "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                      "role": "assistant", "content": "Reading.", "reasoning_content": "Need the file.",
                      "tool_calls": [{"id": "call_9", "type": "function", "function": {"name": "read_file", "arguments": '{"path": "a.py"}'}}]}}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}
    vllm.play(Turn(body=completion))
    events = collect(generic_backend(vllm), tools=[READ_FILE])
    assert events == [ReasoningDelta("Need the file."), ContentDelta("Reading."),
                      ToolCall("read_file", {"path": "a.py"}, '{"path": "a.py"}', "call_9"), Usage(5, 3, 0), Finish("tool_calls")]


def test_a_rate_limit_sent_as_a_200_json_error_is_retried(hosted):
    hosted.play(Turn(body={"error": {"code": "1302", "message": "并发数过高"}}), reply("ok"))
    events = collect(hosted_backend(hosted))
    assert of_type(events, Notice)[0].message.startswith("rate limited, retrying in")
    assert text_of(events, ContentDelta) == "ok"
