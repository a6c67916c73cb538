"""The whole agent over real tools, a real git repository and a real failing pytest suite, with
the model's output scripted as raw GLM-4.7 text played through the real parser."""

import subprocess
import sys

import git
import pytest

from glmcode.agent.approval import ApprovalMode, Approver
from glmcode.agent.events import ToolFinished
from glmcode.agent.loop import Agent, AgentConfig
from glmcode.agent.session import SessionStore
from glmcode.backends.replay import ReplayBackend
from glmcode.tools.workspace import Workspace

CALC = "def add(a, b):\n    return a - b\n\n\ndef mul(a, b):\n    return a * b\n"
TESTS = (
    "from calc import add, mul\n\n\n"
    "def test_add():\n    assert add(2, 3) == 5\n\n\n"
    "def test_mul():\n    assert mul(2, 3) == 6\n"
)


def tool_call(name: str, **arguments: str) -> str:
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{v}</arg_value>" for k, v in arguments.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


FIX_SCRIPT = [
    "The user wants the failing tests fixed. Run them first.</think>" + tool_call("run_tests"),
    "test_add fails: add(2, 3) gives -1. Read calc.py.</think>" + tool_call("read_file", path="calc.py"),
    "add subtracts instead of adding.</think>Fixing the operator in `add`."
    + tool_call("edit_file", path="calc.py", old_string="return a - b", new_string="return a + b"),
    "Check that the suite passes now.</think>" + tool_call("run_tests"),
    "Both tests pass.</think>Fixed `add` in calc.py: it subtracted instead of adding. Both tests pass.",
]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")  # the inner pytest runs start fast
    root = tmp_path / "repo"
    root.mkdir()
    (root / "calc.py").write_text(CALC)
    (root / "test_calc.py").write_text(TESTS)
    (root / "AGENTS.md").write_text("Keep functions small.\n")
    repository = git.Repo.init(root)
    repository.index.add(["calc.py", "test_calc.py", "AGENTS.md"])
    repository.index.commit("a calculator with a bug")
    return root


def pytest_passes(root) -> bool:
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    return subprocess.run(command, cwd=root, capture_output=True).returncode == 0


def make_agent(repo, script, mode="yolo", session=None, ask=None):
    workspace = Workspace(repo, test_command=f"{sys.executable} -m pytest -q -p no:cacheprovider")
    backend = ReplayBackend(script)
    events = []
    approver = Approver(ApprovalMode(mode), ask=ask)
    agent = Agent(backend, workspace, approver, AgentConfig(), session=session, on_event=events.append)
    return agent, backend, events


def test_fixes_a_failing_test_suite(repo, tmp_path):
    assert not pytest_passes(repo)
    session = SessionStore(tmp_path / "sessions").create({"repo": str(repo)})
    agent, backend, events = make_agent(repo, FIX_SCRIPT, session=session)

    result = agent.run("The tests fail. Fix the bug.")

    assert (result.status, result.turns, backend.remaining) == ("done", 5, 0)
    assert result.final_text.startswith("Fixed `add` in calc.py")
    assert (repo / "calc.py").read_text() == CALC.replace("a - b", "a + b")
    assert pytest_passes(repo)
    finished = [e for e in events if isinstance(e, ToolFinished)]
    assert [(e.name, e.result.is_error) for e in finished] == [
        ("run_tests", True),
        ("read_file", False),
        ("edit_file", False),
        ("run_tests", False),
    ]
    # the system prompt carries the instruction file; the model saw its own reasoning each step
    system = agent.messages[0]["content"]
    assert "Keep functions small." in system
    assert "## Repository map" in system and "calc.py" in system and "add" in system
    last_request = backend.requests[-1].messages
    assert last_request[-2]["reasoning_content"] == "Check that the suite passes now."
    # the session holds the whole conversation, and the user's git index was not touched
    assert SessionStore(tmp_path / "sessions").open("last").messages() == agent.messages
    repository = git.Repo(repo)
    assert repository.index.diff("HEAD") == [] and repository.git.stash("list") == ""

    # the last step ran the tests, which changed nothing: one undo reverts the edit itself
    assert agent.undo() == ["calc.py"]
    assert (repo / "calc.py").read_text() == CALC


def test_malformed_calls_are_fed_back_and_the_model_recovers(repo):
    script = [
        "Read the file.</think>" + tool_call("read_file", file="calc.py"),  # wrong argument name
        "Wrong argument name; it is path.</think>" + tool_call("read_file", path="calc.py"),
        "Now an unfinished call.</think><tool_call>read_file<arg_key>path</arg_key><arg_value>calc",
        "That call was cut off. I have what I need.</think>add subtracts; mul is right.",
    ]
    agent, _, events = make_agent(repo, script)
    result = agent.run("What is wrong with calc.py?")
    assert result.status == "done"
    results = [e.result for e in events if isinstance(e, ToolFinished)]
    assert results[0].is_error and "path" in results[0].output
    assert not results[1].is_error and "return a - b" in results[1].output
    assert results[2].is_error
    assert (repo / "calc.py").read_text() == CALC


def test_ask_mode_with_nobody_to_answer_refuses_edits(repo):
    script = [
        "Read it first.</think>" + tool_call("read_file", path="calc.py"),
        "Fix.</think>" + tool_call("edit_file", path="calc.py", old_string="return a - b", new_string="return a + b"),
        "The edit was refused.</think>I could not edit calc.py: edits need your approval.",
    ]
    agent, _, events = make_agent(repo, script, mode="ask")
    result = agent.run("Fix calc.py")
    assert result.status == "done"
    denied = [e for e in events if isinstance(e, ToolFinished) and e.denied]
    assert [e.name for e in denied] == ["edit_file"] and denied[0].result.output.startswith("Denied:")
    assert (repo / "calc.py").read_text() == CALC
