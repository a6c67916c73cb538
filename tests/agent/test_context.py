from glmcode.agent.context import (
    Compactor,
    TokenCounter,
    build_system_prompt,
    estimate_tokens,
    find_instruction_files,
    load_instructions,
    split_for_summary,
)
from glmcode.agent.events import Compacted
from glmcode.agent.loop import AgentConfig
from glmcode.agent.messages import system_message, tool_message, user_message
from glmcode.backends.base import Sampling, Thinking
from glmcode.events import ContentDelta, Finish, Usage

from tests.agent.support import EventBackend, answer, call
from tests.agent.test_loop import make_agent


class CharBackend(EventBackend):
    """Counts one token per character of content, so compaction thresholds are exact."""

    def count_tokens(self, messages, tools):
        return sum(len(m.get("content") or "") for m in messages)


def summary_step(text="SUMMARY"):
    return [ContentDelta(text), Finish("stop")]


def assistant_call(call_id, name="read_note"):
    return {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": {"name": call_id}}}],
    }


def test_instruction_files_from_root_down_with_fallbacks(tmp_path):
    (tmp_path / "AGENTS.md").write_text("root agents")
    (tmp_path / "CLAUDE.md").write_text("root claude, shadowed")
    pkg = tmp_path / "pkg" / "sub"
    pkg.mkdir(parents=True)
    (tmp_path / "pkg" / "CONVENTIONS.md").write_text("pkg conventions")
    (pkg / "CLAUDE.md").write_text("sub claude")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "AGENTS.md").write_text("not on the path")

    files = find_instruction_files(tmp_path, pkg)
    names = [f.relative_to(tmp_path).as_posix() for f in files]
    assert names == ["AGENTS.md", "pkg/CONVENTIONS.md", "pkg/sub/CLAUDE.md"]
    assert find_instruction_files(tmp_path) == [tmp_path / "AGENTS.md"]
    text = load_instructions(tmp_path, pkg).text
    assert text.index("root agents") < text.index("pkg conventions") < text.index("sub claude")


def test_instructions_are_capped_with_a_visible_note(tmp_path):
    (tmp_path / "AGENTS.md").write_text("rule\n" * 1000)
    instructions = load_instructions(tmp_path, limit=100)
    assert instructions.capped
    assert "capped at 100 characters" in instructions.text and len(instructions.text) < 300
    prompt = build_system_prompt(tmp_path, instructions, repo_map="a.py\n  def main()")
    assert "capped at 100 characters" in prompt and "def main()" in prompt and str(tmp_path) in prompt


def test_token_counter_prefers_exact_then_usage_anchor():
    messages = [system_message("s" * 350), user_message("u" * 350)]
    assert TokenCounter(EventBackend([], exact_tokens=42)).count(messages, []) == 42
    counter = TokenCounter(EventBackend([]))
    assert counter.count(messages, []) == estimate_tokens(messages)
    counter.observe(Usage(prompt_tokens=1000, completion_tokens=50), messages)
    messages.append(tool_message("c1", "read_note", "t" * 700))
    assert counter.count(messages, []) == 1050 + estimate_tokens(messages[2:])
    # a rewritten conversation (compaction) no longer matches the anchor: estimate it all
    assert counter.count(messages[1:], []) == estimate_tokens(messages[1:])
    rewritten = [messages[0], user_message("u"), messages[2]]
    assert counter.count(rewritten, []) == estimate_tokens(rewritten)


def conversation():
    return [
        system_message("SYSTEM with instructions"),
        user_message("old request"),
        assistant_call("c1"),
        tool_message("c1", "read_note", "A" * 3000),
        {"role": "assistant", "content": "old answer"},
        user_message("LATEST request"),
        assistant_call("c2"),
        tool_message("c2", "read_note", "B" * 3000),
        assistant_call("c3"),
        tool_message("c3", "read_note", "C" * 3000),
    ]


def test_split_keeps_system_latest_user_and_last_step():
    head, middle, tail = split_for_summary(conversation())
    assert [m["content"][:6] for m in head] == ["SYSTEM"]
    assert tail[0]["content"] == "LATEST request"
    assert tail[1]["tool_calls"][0]["id"] == "c3" and tail[2]["tool_call_id"] == "c3"
    assert len(middle) == 6


def test_shortening_old_tool_outputs_is_tried_first():
    backend = CharBackend([], context_window=10_000)  # limit 8000; the conversation has ~9100
    compaction = Compactor(backend, TokenCounter(backend)).compact(conversation(), [], Sampling())
    assert backend.requests == []  # no summary needed
    outputs = [m["content"] for m in compaction.messages if m["role"] == "tool"]
    assert [len(o) < 1200 for o in outputs] == [True, True, False]  # the latest step's output is intact
    assert compaction.after_tokens < 8000 < compaction.before_tokens


def test_summary_replaces_the_middle_and_keeps_required_parts():
    backend = CharBackend([summary_step("The user wanted notes read.")], context_window=4_000)
    compaction = Compactor(backend, TokenCounter(backend)).compact(conversation(), [], Sampling())
    roles = [m["role"] for m in compaction.messages]
    assert roles == ["system", "user", "user", "assistant", "tool"]
    system, summary, latest, step, result = compaction.messages
    assert system["content"] == "SYSTEM with instructions" and latest["content"] == "LATEST request"
    assert summary["content"].endswith("The user wanted notes read.") and "compacted" in summary["content"]
    assert result["content"] == "C" * 3000
    request = backend.requests[0]
    assert request.thinking == Thinking(enabled=False) and request.tools == []
    transcript = request.messages[1]["content"]
    assert "old request" in transcript and "LATEST request" not in transcript and "called read_note" in transcript


def test_agent_compacts_at_the_threshold_and_emits_an_event(tmp_path):
    (tmp_path / "big").write_text("z" * 3000)
    steps = [call("read_note", name="big"), call("read_note", name="missing"), summary_step(), answer("done")]
    backend = CharBackend(steps, context_window=6_000)
    config = AgentConfig(compact_threshold=0.5)
    agent, _, events = make_agent(tmp_path, steps, config, backend=backend)
    agent.messages[0]["content"] = "short system prompt"
    agent.run("read big")
    compacted = [e for e in events if isinstance(e, Compacted)]
    assert len(compacted) == 1 and compacted[0].after_tokens < compacted[0].before_tokens
    # shortening alone sufficed: the big output was cut, the summarizer was never asked
    assert "characters omitted" in backend.requests[2].messages[3]["content"]
    assert len(backend.requests) == 3


def test_on_demand_compact_summarizes_even_under_the_threshold(tmp_path):
    steps = [answer("first"), answer("second"), summary_step("S")]
    agent, backend, events = make_agent(tmp_path, steps)
    agent.run("one")
    assert agent.compact() is None  # a single exchange: nothing older to summarize
    agent.run("two")
    event = agent.compact()
    assert isinstance(event, Compacted) and event in events
    assert [m["role"] for m in agent.messages] == ["system", "user", "user", "assistant"]
    assert agent.messages[1]["content"].endswith("S")
    assert [m["content"] for m in agent.messages[2:]] == ["two", "second"]


def test_a_cancelled_summary_leaves_the_conversation_alone(tmp_path):
    import threading

    cancel = threading.Event()

    def summary(cancel_event):
        yield ContentDelta("Half a sum")
        cancel_event.set()
        yield ContentDelta("mary")

    agent, _, events = make_agent(tmp_path, [answer("first"), answer("second"), summary])
    agent.run("one")
    agent.run("two")
    before = list(agent.messages)
    assert agent.compact(cancel=cancel) is None
    assert agent.messages == before
    assert any("compaction cancelled" in getattr(e, "message", "") for e in events)
