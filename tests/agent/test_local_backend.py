"""The local backend over the real engine on a tiny random checkpoint: only the plumbing is
checked (random weights write noise), i.e. rendering, streaming, usage, the prefix cache between
steps, cancellation, overflow, and the loop running steps and stopping cleanly."""

import threading

import pytest
import torch

from glmcode.agent.loop import Agent, AgentConfig
from glmcode.agent.messages import AssistantStep, unanswered_calls, user_message
from glmcode.backends.base import Sampling, Thinking
from glmcode.backends.local import LocalBackend
from glmcode.chat_format import render_ids
from glmcode.engine import LLM
from glmcode.errors import ContextOverflow
from glmcode.events import Finish, Usage

from tests.agent.support import Approver, Checkpoints, Workspace, note_tools

BLOCK = 16
GREEDY = Sampling(max_tokens=8, temperature=0)


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    torch.set_num_threads(1)
    return LLM(tiny_checkpoint, progress=False, block_size=BLOCK)


def play(backend, messages, tools=(), thinking=Thinking(), sampling=GREEDY, cancel=None):
    events = list(backend.stream(messages, list(tools), thinking, sampling, cancel))
    step = AssistantStep()
    for event in events:
        step.add(event)
    return events, step


def test_streams_a_step_with_exact_usage(llm):
    backend = LocalBackend(llm)
    messages = [user_message("Which file holds the parser?")]
    specs = [tool.spec() for tool in note_tools()]
    prompt = render_ids(llm.tokenizer, messages, specs, enable_thinking=True, clear_thinking=False)
    assert backend.count_tokens(messages, specs) == len(prompt)
    events, step = play(backend, messages, specs)
    usage = next(e for e in events if isinstance(e, Usage))
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(prompt), 8)
    assert events[-1] == Finish("length") and backend.context_window == llm.max_context


def test_the_next_step_prefills_only_what_is_new(llm):
    backend = LocalBackend(llm)
    messages = [user_message("Read the notes and tell me what they say, please. " * 4)]
    first, step = play(backend, messages)
    first_prompt = next(e for e in first if isinstance(e, Usage)).prompt_tokens
    messages += [step.to_message(), user_message("And then?")]
    second, _ = play(backend, messages)
    usage = next(e for e in second if isinstance(e, Usage))
    # every full block of the first prompt (all but possibly its final `<think>`) comes from the cache
    assert usage.cached_tokens >= (first_prompt - 1) // BLOCK * BLOCK > 0
    assert usage.cached_tokens < usage.prompt_tokens


def test_cancel_stops_generation_and_frees_the_engine(llm):
    backend = LocalBackend(llm)
    cancel = threading.Event()
    cancel.set()
    events, step = play(backend, [user_message("hi")], sampling=Sampling(max_tokens=50, temperature=0), cancel=cancel)
    assert events[-1] == Finish("cancelled") and step.is_empty
    assert play(backend, [user_message("hi")])[0][-1] == Finish("length")


def test_a_conversation_too_long_for_the_context_overflows(llm):
    backend = LocalBackend(llm)
    huge = [user_message("word " * (llm.max_context + 10))]
    with pytest.raises(ContextOverflow):
        backend.stream(huge, [], Thinking(), GREEDY)


def test_the_loop_runs_steps_and_stops_cleanly(llm, tmp_path):
    backend = LocalBackend(llm)
    config = AgentConfig(max_turns=2, sampling=GREEDY)
    agent = Agent(backend, Workspace(tmp_path), Approver(), config, tools=note_tools(), checkpoints=Checkpoints())
    result = agent.run("Summarize the notes.")
    assert result.status in ("done", "limit") and 1 <= result.turns <= 2
    assert result.usage.completion_tokens == 8 * result.turns
    assert agent.messages[2]["role"] == "assistant" and unanswered_calls(agent.messages) == []
    assert agent.context_tokens() == len(
        render_ids(llm.tokenizer, agent.messages, agent.tool_specs, enable_thinking=True, clear_thinking=False)
    )
