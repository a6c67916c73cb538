"""Ctrl-C handling during a run, and the approval prompt's answers."""

from __future__ import annotations

import io
import signal
import threading

import pytest
from rich.console import Console

from glmcode.console import ApprovalPrompt, PlainRenderer, RunStats
from glmcode.errors import Interrupted
from glmcode.run import ctrl_c_cancels


@pytest.mark.usefixtures("ctrl_c_raises")
def test_first_ctrl_c_cancels_the_run_and_the_second_interrupts() -> None:
    cancel = threading.Event()
    notes: list[str] = []
    with pytest.raises(Interrupted), ctrl_c_cancels(cancel, on_first=lambda: notes.append("stopping")):
        signal.raise_signal(signal.SIGINT)
        assert cancel.is_set() and notes == ["stopping"]
        with pytest.raises(KeyboardInterrupt):
            signal.raise_signal(signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


@pytest.mark.usefixtures("ctrl_c_raises")
def test_one_ctrl_c_only_cancels() -> None:
    cancel = threading.Event()
    with ctrl_c_cancels(cancel, on_first=lambda: None):
        signal.raise_signal(signal.SIGINT)
    assert cancel.is_set()


def _prompt(answers: list[object], interrupted: list[bool]) -> tuple[ApprovalPrompt, io.StringIO]:
    shown = io.StringIO()

    def read_line(question: str) -> str:
        answer = answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return str(answer)

    renderer = PlainRenderer(RunStats(model="m"), io.StringIO(), io.StringIO())
    prompt = ApprovalPrompt(renderer, Console(file=shown, width=100), read_line,
                            on_interrupt=lambda: interrupted.append(True))
    return prompt, shown


def test_approval_prompt_shows_the_diff_and_remembers_always() -> None:
    approval = pytest.importorskip("glmcode.agent.approval")
    interrupted: list[bool] = []
    prompt, shown = _prompt(["maybe", "y", "n", "a"], interrupted)
    diff = "--- a/x.py\n+++ b/x.py\n@@ -1 +1 @@\n-old\n+new\n"
    edit = approval.ApprovalRequest("edit_file", {"path": "x.py"}, diff)
    assert prompt(edit) is True, "an unclear answer asks again, then yes"
    assert "+new" in shown.getvalue()
    command = approval.ApprovalRequest("run_command", {"command": "make test"}, "make test")
    assert prompt(command) is False
    assert prompt(command) is True  # "a": always
    assert prompt(command) is True, "not asked again"
    other = approval.ApprovalRequest("run_command", {"command": "make deploy"}, "make deploy")
    prompt.read_line = lambda question: (_ for _ in ()).throw(KeyboardInterrupt())
    assert prompt(other) is False and interrupted == [True]
