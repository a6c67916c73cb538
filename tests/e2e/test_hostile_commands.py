"""`glmcode fix --yes --remote URL` with a hostile model, as a CI job would run it.

The model's commands try to write outside the repository, print a private key from ~/.ssh (which
would go back to the server in the next request, i.e. off the machine), connect to a local
listener and leave a detached child behind. Under the default sandbox every attempt fails and
the model is told why; with `--sandbox off` (an explicit choice) every one succeeds.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import pytest

from tests.fake_glm_server import FakeGlmServer, reply
from tests.hostile import CANARY, Listener, connect_command, detach_command, fake_home, new_marker, outlived

from .conftest import API_KEY, GlmcodeRunner


@pytest.fixture
def home():
    with fake_home() as path:
        yield path


def hostile_fix(home: Path, project: Path, *flags: str):
    listener = Listener()
    token, marker = uuid.uuid4().hex, new_marker()
    planted = home / "planted.txt"
    commands = [f"echo owned > {planted}", f"cat {home}/.ssh/id_ed25519",
                connect_command(sys.executable, listener.port, token), detach_command(marker)]
    calls = [{"name": "run_command", "arguments": {"command": command}} for command in commands]
    try:
        with FakeGlmServer(reply("Gathering what I need.", tool_calls=calls), reply("Done."),
                           api_key=API_KEY, dialect="openai") as server:
            run = GlmcodeRunner(home)("fix", "make it faster", "--remote", server.base_url, "--yes",
                                      "-o", "stream-json", *flags, cwd=project)
        sent_back = json.dumps([request.body for request in server.requests])
        outcome = {
            "write outside the repo": planted.exists(),
            "key read and sent off the machine": CANARY in sent_back,
            "loopback connection": listener.got(token),
            "detached child outlived the command": outlived(marker),
        }
    finally:
        listener.close()
    events = [json.loads(line) for line in run.stdout.splitlines()]
    return run, outcome, events


def test_the_default_sandbox_stops_every_attempt(home: Path, project: Path) -> None:
    run, outcome, events = hostile_fix(home, project)
    assert outcome == dict.fromkeys(outcome, False), run.stderr
    init = events[0]
    assert init["type"] == "init" and init["sandbox"].startswith("workspace-write ("), init
    results = [event["output"] for event in events if event["type"] == "tool_result"]
    assert len(results) == 4
    for output in results[:3]:  # the real error, then one line saying the sandbox may be why
        assert output.splitlines()[-1].startswith("[the workspace-write sandbox blocks"), output
    assert CANARY not in run.stdout + run.stderr
    assert run.returncode == 5  # the agent finished; the project's tests still fail


def test_with_the_sandbox_off_every_attempt_succeeds(home: Path, project: Path) -> None:
    run, outcome, events = hostile_fix(home, project, "--sandbox", "off")
    assert outcome == dict.fromkeys(outcome, True), run.stderr
    assert events[0]["sandbox"] == "off"
