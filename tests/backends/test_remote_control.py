"""Cancellation and the per-endpoint concurrency limit."""

from __future__ import annotations

import threading

from glmcode.backends.base import Sampling, Thinking
from glmcode.events import ContentDelta, Error, Finish, Notice
from tests.backends.conftest import USER, collect, generic_backend, hosted_backend, of_type, text_of
from tests.fake_glm_server import error, reply

WAIT = 10.0  # generous bound for thread hand-offs; never reached when the code works


def test_cancel_in_the_middle_of_a_silent_stream_ends_it_at_once(hosted):
    hosted.play(reply("One two three", chunk_size=4).stall(after=1, seconds=20))
    backend = hosted_backend(hosted, timeout=15.0)
    cancel = threading.Event()
    events = []
    for event in backend.stream(USER, [], Thinking(), Sampling(), cancel):
        events.append(event)
        if isinstance(event, ContentDelta):
            cancel.set()
    # Ended by the cancel, not by the 15 s read timeout (which would be an Error).
    assert events == [ContentDelta("One "), Finish("cancelled")]


def test_cancel_during_a_retry_wait(hosted):
    hosted.play(error(429, "busy", code="1302", headers={"Retry-After": "20"}))
    cancel = threading.Event()
    events = []
    for event in hosted_backend(hosted).stream(USER, [], Thinking(), Sampling(), cancel):
        events.append(event)
        if isinstance(event, Notice):
            cancel.set()
    assert [type(e) for e in events] == [Notice, Finish] and events[-1] == Finish("cancelled")
    assert "retrying in 20s" in events[0].message
    assert len(hosted.bodies) == 1


def test_cancel_before_the_request_sends_nothing(hosted):
    cancel = threading.Event()
    cancel.set()
    assert collect(hosted_backend(hosted), cancel=cancel) == [Finish("cancelled")]
    assert hosted.requests == []


class _Consumer(threading.Thread):
    """Drains a stream on its own thread; `waiting` is set once it reports a full endpoint."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream = stream
        self.events = []
        self.waiting = threading.Event()

    def run(self):
        for event in self.stream:
            self.events.append(event)
            if isinstance(event, Notice):
                self.waiting.set()


def test_the_hosted_api_gets_one_request_at_a_time(hosted):
    gate = threading.Event()
    hosted.play(reply("first answer").hold(after=1, until=gate), reply("second answer"))
    backend = hosted_backend(hosted, timeout=WAIT)
    first = backend.stream(USER, [], Thinking(), Sampling())
    first_events = [next(first)]  # the first request is now in flight, paused by the server
    second = _Consumer(backend.stream(USER, [], Thinking(), Sampling()))
    second.start()
    assert second.waiting.wait(WAIT)
    assert "concurrency limit 1" in second.events[0].message
    gate.set()
    first_events += list(first)
    second.join(WAIT)
    assert text_of(first_events, ContentDelta) == "first answer"
    assert text_of(second.events, ContentDelta) == "second answer" and second.events[-1] == Finish("stop")
    assert hosted.max_in_flight == 1


def test_a_raised_limit_lets_requests_overlap(vllm):
    gate = threading.Event()
    vllm.play(reply("first answer").hold(after=1, until=gate), reply("second answer"))
    backend = generic_backend(vllm, concurrency=2, timeout=WAIT)
    no_thinking = Thinking(enabled=False)  # so content flows at once from a generic server
    first = backend.stream(USER, [], no_thinking, Sampling())
    first_events = [next(first)]
    second_events = collect(backend, thinking=no_thinking)  # completes while the first is in flight
    gate.set()
    first_events += list(first)
    assert of_type(second_events, Notice) == [] and text_of(second_events, ContentDelta) == "second answer"
    assert text_of(first_events, ContentDelta) == "first answer"
    assert vllm.max_in_flight == 2


def test_a_request_waiting_for_a_slot_can_be_cancelled(hosted):
    gate = threading.Event()
    hosted.play(reply("first answer").hold(after=1, until=gate))
    backend = hosted_backend(hosted, timeout=WAIT)
    first = backend.stream(USER, [], Thinking(), Sampling())
    next(first)
    cancel = threading.Event()
    second = _Consumer(backend.stream(USER, [], Thinking(), Sampling(), cancel))
    second.start()
    assert second.waiting.wait(WAIT)
    cancel.set()
    second.join(WAIT)
    assert second.events[-1] == Finish("cancelled") and len(hosted.bodies) == 1
    gate.set()
    assert list(first)[-1] == Finish("stop")


def test_a_stream_abandoned_by_its_consumer_frees_the_slot(hosted):
    gate = threading.Event()
    hosted.play(reply("abandoned").hold(after=1, until=gate), reply("next"))
    backend = hosted_backend(hosted, timeout=WAIT)
    abandoned = backend.stream(USER, [], Thinking(), Sampling())
    next(abandoned)
    abandoned.close()  # e.g. the agent stops iterating
    events = collect(backend)
    assert of_type(events, Notice) == [] and text_of(events, ContentDelta) == "next"
    assert of_type(events, Error) == []
    gate.set()
