import threading

import pytest

from glmcode.agent.events import Compacted, StepStarted, ToolFinished, ToolStarted
from glmcode.agent.loop import Agent, AgentConfig
from glmcode.agent.messages import unanswered_calls
from glmcode.agent.session import SessionStore
from glmcode.backends.base import Thinking
from glmcode.errors import ContextOverflow, ServerError
from glmcode.events import ContentDelta, Finish, ReasoningDelta, ToolCall, ToolCallError, Usage

from tests.agent.support import Approver, Checkpoints, EventBackend, Workspace, answer, call, note_tools


def make_agent(tmp_path, steps, config=None, **kwargs):
    backend = kwargs.pop("backend", None) or EventBackend(steps)
    events = []
    agent = Agent(
        backend,
        Workspace(tmp_path),
        kwargs.pop("approver", None) or Approver(),
        config or AgentConfig(),
        tools=note_tools(),
        checkpoints=kwargs.pop("checkpoints", None) or Checkpoints(),
        on_event=events.append,
        **kwargs,
    )
    return agent, backend, events


def tool_results(agent):
    return [m["content"] for m in agent.messages if m["role"] == "tool"]


def test_reads_writes_then_answers(tmp_path):
    (tmp_path / "todo").write_text("buy milk")
    checkpoints = Checkpoints()
    agent, backend, events = make_agent(
        tmp_path,
        [call("read_note", name="todo"), call("write_note", name="done", text="milk bought"), answer("All done.")],
        checkpoints=checkpoints,
    )
    result = agent.run("handle my todo")

    assert (result.status, result.turns, result.final_text) == ("done", 3, "All done.")
    assert (tmp_path / "done").read_text() == "milk bought"
    assert tool_results(agent) == ["buy milk", "wrote done"]
    assert result.usage == Usage(100 + 100 + 120, 10 + 10 + 5)
    # only the edit tool was checkpointed, with the paths it touches
    assert checkpoints.snapshots == [(checkpoints.snapshots[0][0], [tmp_path / "done"])]
    # the model saw the previous step's reasoning, call and result (interleaved thinking)
    last_request = backend.requests[-1].messages
    assert [m["role"] for m in last_request] == ["system", "user", "assistant", "tool", "assistant", "tool"]
    assert last_request[2]["reasoning_content"] == "I will call read_note."
    assert last_request[2]["tool_calls"][0]["function"] == {"name": "read_note", "arguments": {"name": "todo"}}
    assert last_request[3]["tool_call_id"] == last_request[2]["tool_calls"][0]["id"]
    kinds = [type(e).__name__ for e in events if isinstance(e, (StepStarted, ToolStarted, ToolFinished))]
    assert kinds == ["StepStarted", "ToolStarted", "ToolFinished"] * 2 + ["StepStarted"]


def test_reasoning_and_content_are_stored_byte_exact(tmp_path):
    reasoning = ["  Think\n", "ing é\t", "\n"]
    content = ["\nAnswer ", " with  spaces \n"]
    step = [ReasoningDelta(t) for t in reasoning] + [ContentDelta(t) for t in content] + [Finish("stop")]
    agent, _, _ = make_agent(tmp_path, [step])
    agent.run("hi")
    assert agent.messages[-1] == {
        "role": "assistant",
        "content": "".join(content),
        "reasoning_content": "".join(reasoning),
    }


def test_thinking_defaults_to_preserved_and_switches_per_turn(tmp_path):
    agent, backend, _ = make_agent(tmp_path, [answer("one"), answer("two")])
    agent.run("first")
    agent.set_thinking(False)
    agent.run("second")
    assert backend.requests[0].thinking == Thinking(enabled=True, clear_thinking=False)
    assert backend.requests[1].thinking == Thinking(enabled=False, clear_thinking=False)


def test_malformed_call_and_unknown_tool_are_fed_back(tmp_path):
    bad = [
        ToolCallError(raw="<tool_call>write_note<arg_key>name", message="unterminated tool call", name="write_note"),
        ToolCall("no_such_tool", {}),
        Finish("tool_calls"),
    ]
    agent, backend, _ = make_agent(tmp_path, [bad, answer("ok")])
    result = agent.run("go")
    assert result.status == "done"
    malformed, unknown = tool_results(agent)
    assert "unterminated tool call" in malformed
    assert "no tool named 'no_such_tool'" in unknown and "read_note" in unknown
    # the failed calls carry ids matched by their results, so the next request is well formed
    assert unanswered_calls(backend.requests[1].messages) == []


def test_tool_exception_becomes_an_error_result(tmp_path):
    agent, _, events = make_agent(tmp_path, [call("explode"), answer("sorry")])
    assert agent.run("go").status == "done"
    assert "the tool blew up" in tool_results(agent)[0]
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert finished[0].result.is_error


def test_denied_call_tells_the_model_why(tmp_path):
    approver = Approver(deny={"write_note"})
    checkpoints = Checkpoints()
    agent, _, events = make_agent(
        tmp_path, [call("write_note", name="a", text="x"), answer("ok")], approver=approver, checkpoints=checkpoints
    )
    agent.run("go")
    assert not (tmp_path / "a").exists()
    assert tool_results(agent) == ["Denied: write_note is not allowed in this test"]
    assert approver.seen == [("write_note", {"name": "a", "text": "x"}, "write a")]
    assert checkpoints.snapshots == []
    assert [e.denied for e in events if isinstance(e, ToolFinished)] == [True]


def test_long_output_is_truncated_head_and_tail(tmp_path):
    agent, _, _ = make_agent(tmp_path, [call("shout", n=5000), answer("ok")], AgentConfig(tool_output_limit=1000))
    agent.run("go")
    output = tool_results(agent)[0]
    assert output.startswith("x" * 500) and output.endswith("x" * 500)
    assert "4000 characters omitted" in output and len(output) < 1200


def test_loop_guard_warns_then_stops(tmp_path):
    steps = [call("read_note", name="same") for _ in range(5)]
    agent, backend, _ = make_agent(tmp_path, steps, AgentConfig(repeat_warn=3, repeat_stop=5))
    result = agent.run("go")
    assert result.status == "limit" and "loop guard" in result.error
    results = tool_results(agent)
    assert ["Warning" in r for r in results] == [False, False, True, True, False]
    assert results[4].startswith("Error: not run") and len(backend.requests) == 5


def test_loop_guard_counts_only_consecutive_repeats(tmp_path):
    steps = [call("read_note", name="a"), call("read_note", name="b")] * 3 + [answer("ok")]
    agent, _, _ = make_agent(tmp_path, steps, AgentConfig(repeat_warn=2, repeat_stop=3))
    assert agent.run("go").status == "done"
    assert not any("Warning" in r for r in tool_results(agent))


def test_turn_limit(tmp_path):
    steps = [call("read_note", name=str(i)) for i in range(5)]
    agent, backend, _ = make_agent(tmp_path, steps, AgentConfig(max_turns=2))
    result = agent.run("go")
    assert (result.status, result.turns, len(backend.requests)) == ("limit", 2, 2)
    assert "turn limit" in result.error
    assert unanswered_calls(agent.messages) == []


def test_token_limit(tmp_path):
    steps = [call("read_note", name=str(i)) for i in range(5)]
    agent, backend, _ = make_agent(tmp_path, steps, AgentConfig(max_tokens=200))
    result = agent.run("go")
    # each step reports 110 tokens: the second step crosses 200, and its call is not run
    assert (result.status, len(backend.requests)) == ("limit", 2)
    assert tool_results(agent)[-1] == "Error: not run: token limit reached (220 of 200)."


def test_wall_time_limit(tmp_path):
    agent, backend, _ = make_agent(tmp_path, [answer("never")], AgentConfig(wall_time=0))
    result = agent.run("go")
    assert result.status == "limit" and "wall time" in result.error and backend.requests == []


def test_cancel_during_generation_keeps_partial_text(tmp_path):
    def generation(cancel):
        yield ReasoningDelta("Thinking about it")
        yield ContentDelta("Partial ans")
        cancel.set()  # Ctrl-C arrives here
        yield ContentDelta("wer that must not be kept")
        yield ToolCall("read_note", {"name": "x"})

    cancel = threading.Event()
    agent, _, events = make_agent(tmp_path, [generation])
    result = agent.run("go", cancel=cancel)
    assert result.status == "cancelled"
    partial = {"role": "assistant", "content": "Partial ans", "reasoning_content": "Thinking about it"}
    assert agent.messages[-1] == partial
    assert Finish("cancelled") in events


def test_cancel_between_tool_calls_answers_every_call(tmp_path):
    cancel = threading.Event()
    two_calls = [
        ToolCall("read_note", {"name": "a"}),
        ToolCall("write_note", {"name": "b", "text": "t"}),
        Finish("tool_calls"),
    ]
    agent, _, _ = make_agent(tmp_path, [two_calls])
    agent.on_event = lambda e: cancel.set() if isinstance(e, ToolFinished) else None
    result = agent.run("go", cancel=cancel)
    assert result.status == "cancelled"
    assert not (tmp_path / "b").exists()
    assert tool_results(agent)[1] == "Error: not run: cancelled by the user."
    assert unanswered_calls(agent.messages) == []


def test_ctrl_c_inside_a_tool(tmp_path):
    steps = [[ToolCall("interrupt", {}), ToolCall("read_note", {"name": "a"}), Finish("tool_calls")]]
    agent, _, _ = make_agent(tmp_path, steps)
    result = agent.run("go")
    assert result.status == "cancelled"
    interrupted, not_run = tool_results(agent)
    assert "interrupted" in interrupted and not_run == "Error: not run: cancelled by the user."
    # the conversation goes on normally afterwards
    agent.backend.steps.append(answer("back"))
    assert agent.run("continue").final_text == "back"


def test_backend_error_ends_the_run_consistently(tmp_path):
    agent, _, _ = make_agent(tmp_path, [ServerError("server unreachable at http://127.0.0.1:9")])
    result = agent.run("go")
    assert (result.status, result.error) == ("error", "server unreachable at http://127.0.0.1:9")
    assert isinstance(result.exception, ServerError)
    assert agent.messages[-1]["role"] == "user"


def test_context_overflow_compacts_once_and_retries(tmp_path):
    history = [call("read_note", name="a"), answer("first done")]
    summary = [ContentDelta("The user asked for notes."), Finish("stop")]
    steps = history + [ContextOverflow("prompt too long"), summary, answer("second done")]
    agent, backend, events = make_agent(tmp_path, steps)
    agent.run("first")
    result = agent.run("second")
    assert (result.status, result.final_text) == ("done", "second done")
    assert any(isinstance(e, Compacted) for e in events)
    roles = [m["role"] for m in backend.requests[-1].messages]
    assert roles == ["system", "user", "user"]  # system, summary, the latest request verbatim
    assert backend.requests[-1].messages[2]["content"] == "second"


def test_context_overflow_twice_is_an_error(tmp_path):
    summary = [ContentDelta("summary"), Finish("stop")]
    steps = [answer("first"), ContextOverflow("too long"), summary, ContextOverflow("still too long")]
    agent, _, _ = make_agent(tmp_path, steps)
    agent.run("first")
    result = agent.run("second")
    assert result.status == "error" and "still too long" in result.error
    assert isinstance(result.exception, ContextOverflow)


def test_session_records_everything_and_resumes(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    log = store.create({"repo": str(tmp_path)})
    steps = [call("write_note", name="n", text="hello"), answer("Wrote it.")]
    agent, _, _ = make_agent(tmp_path, steps, session=log)
    agent.run("write a note")

    resumed, backend, _ = make_agent(tmp_path, [answer("It says hello.")], session=store.open("last"))
    assert resumed.messages == agent.messages
    resumed.run("what did you write?")
    assert backend.requests[0].messages[:-1] == agent.messages
    assert store.list()[0].first_user_message == "write a note"


def test_undo_restores_and_tells_the_model(tmp_path):
    checkpoints = Checkpoints(restored=["n"])
    agent, backend, _ = make_agent(tmp_path, [answer("ok"), answer("ok")], checkpoints=checkpoints)
    agent.run("first")
    assert agent.undo() == ["n"]
    agent.run("second")
    latest = backend.requests[1].messages[-1]["content"]
    assert "undid your last change" in latest and latest.endswith("second")


def test_clear_starts_over_with_the_system_prompt(tmp_path):
    agent, _, _ = make_agent(tmp_path, [answer("ok")])
    agent.run("hi")
    agent.clear()
    assert [m["role"] for m in agent.messages] == ["system"]


@pytest.mark.parametrize("name", ["AGENTS.md"])
def test_system_prompt_includes_instructions(tmp_path, name):
    (tmp_path / name).write_text("Always use tabs.")
    agent, _, _ = make_agent(tmp_path, [])
    assert "Always use tabs." in agent.messages[0]["content"]


def test_error_event_mid_stream_keeps_partial_and_answers_calls(tmp_path):
    from glmcode.events import Error

    steps = [[ContentDelta("Working"), ToolCall("read_note", {"name": "a"}), Error("connection reset")]]
    agent, _, _ = make_agent(tmp_path, steps)
    result = agent.run("go")
    assert (result.status, result.error) == ("error", "connection reset")
    assert agent.messages[-2]["content"] == "Working"
    assert tool_results(agent) == ["Error: not run: connection reset."]


def test_ids_from_the_backend_are_kept(tmp_path):
    steps = [[ToolCall("read_note", {"name": "a"}, id="call_remote_1"), Finish("tool_calls")], answer("ok")]
    agent, _, _ = make_agent(tmp_path, steps)
    agent.run("go")
    assert agent.messages[2]["tool_calls"][0]["id"] == "call_remote_1"
    assert agent.messages[3]["tool_call_id"] == "call_remote_1"


class BrokenCheckpoints(Checkpoints):
    def snapshot(self, label, paths=None):
        raise OSError("disk full")


def test_a_failed_checkpoint_is_reported_and_the_edit_still_runs(tmp_path):
    from glmcode.events import Notice

    steps = [call("write_note", name="n", text="t"), answer("ok")]
    agent, _, events = make_agent(tmp_path, steps, checkpoints=BrokenCheckpoints())
    agent.run("go")
    assert (tmp_path / "n").read_text() == "t"
    assert any(isinstance(e, Notice) and "disk full" in e.message for e in events)


def test_a_failing_preview_is_fed_back_without_asking(tmp_path):
    from glmcode.tools.base import Tool, ToolResult

    def preview(ws, args):
        raise ValueError("../x: outside the repository")

    schema = {"type": "object", "properties": {}}
    tool = Tool("guarded", "Edits.", schema, "edit", lambda ws, a: ToolResult("ran"), preview=preview)
    approver = Approver()
    backend = EventBackend([call("guarded"), answer("ok")])
    agent = Agent(backend, Workspace(tmp_path), approver, tools=[tool], checkpoints=Checkpoints())
    agent.run("go")
    assert tool_results(agent) == ["Error: ../x: outside the repository"] and approver.seen == []


def test_resuming_a_session_that_stopped_mid_step_answers_its_calls(tmp_path):
    store = SessionStore(tmp_path / "sessions")
    log = store.create()
    call_message = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "read_note", "arguments": {"name": "a"}}}],
    }
    for message in ({"role": "system", "content": "s"}, {"role": "user", "content": "go"}, call_message):
        log.append({"type": "message", "message": message})  # then the process died

    agent, _, _ = make_agent(tmp_path, [], session=store.open(log.id))
    assert agent.messages[-1] == {
        "role": "tool",
        "tool_call_id": "c1",
        "name": "read_note",
        "content": "Error: not run: the session ended before it ran.",
    }
    assert store.open(log.id).messages() == agent.messages
