"""`glmcode chat` driven as a person would, in a pseudo-terminal, with the replay backend."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("glmcode.agent.loop", reason="needs the agent branch merged")
pexpect = pytest.importorskip("pexpect")

from tests.conftest import ctrl_c_default, ctrl_c_ignored

from .conftest import ANSI_ESCAPE, BUGGY, clean_env
from .test_runs import DONE, EDIT, READ


def spawn_chat(home: Path, repo: Path, script: list[str], tmp_path: Path, *extra: str,
               started=ctrl_c_default) -> pexpect.spawn:
    """A chat at a terminal; started: its preexec_fn, SIGINT's disposition as the chat inherits it."""
    script_path = tmp_path / "chat-script.json"
    script_path.write_text(json.dumps(script))
    env = clean_env(home, PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="120", LINES="40")
    child = pexpect.spawn(sys.executable, ["-m", "glmcode", "chat", "--replay", str(script_path), *extra],
                          cwd=str(repo), env=env, encoding="utf-8", timeout=60, dimensions=(40, 120),
                          preexec_fn=started)
    child.expect("Type a request")
    return child


def test_chat_streams_asks_before_editing_and_can_diff_and_undo(home: Path, repo: Path, tmp_path: Path) -> None:
    child = spawn_chat(home, repo, [READ, EDIT, DONE], tmp_path)
    try:
        child.expect("›")
        child.sendline("please fix add in @calc.py")
        child.expect("attached: calc.py")
        child.expect("read_file calc.py")
        child.expect(r"Allow edit_file\? \[y\]es / \[n\]o / \[a\]lways this session")
        assert "+    return a + b" in child.before, "the approval prompt shows the diff"
        child.sendline("y")
        child.expect("now returns the sum")
        child.expect("›")
        assert (repo / "calc.py").read_text() == "def add(a, b):\n    return a + b\n"

        child.sendline("/diff")
        child.expect(r"\+    return a \+ b")
        child.expect("›")
        child.sendline("/undo")
        child.expect("undone: calc.py")
        child.expect("›")
        assert (repo / "calc.py").read_text() == BUGGY

        child.sendline("/tokens")
        child.expect("generated")
        child.expect("›")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


def test_slash_commands_switch_modes_and_thinking(home: Path, repo: Path, tmp_path: Path) -> None:
    child = spawn_chat(home, repo, [DONE], tmp_path)
    try:
        for command, reply in [("/help", "/compact"), ("/mode plan", "mode: plan"),
                               ("/mode nonsense", "choose from plan, ask, auto-edit, yolo"),
                               ("/think off", "thinking off"), ("/bogus", "unknown command /bogus"),
                               ("/model", "via replay")]:
            child.expect("›")
            child.sendline(command)
            child.expect(reply)
        child.expect("›")
        child.sendcontrol("d")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0


LONG_ANSWER = "Thinking.</think>" + "".join(f"Paragraph {i} of a very long answer.\n\n" for i in range(5000))


def stop_a_long_answer(child) -> None:
    """Ask for the long answer, stop it with Ctrl-C, and wait for the prompt to come back."""
    child.expect("›")
    child.sendline("tell me everything")
    child.expect("Paragraph 3 of")
    child.sendintr()
    child.expect("stopping")
    child.expect("›")


def test_a_second_ctrl_c_just_after_the_stop_leaves_too(home: Path, repo: Path, tmp_path: Path) -> None:
    """The answer may be stopped before the second press comes: back at the prompt, it still leaves."""
    child = spawn_chat(home, repo, [LONG_ANSWER, LONG_ANSWER], tmp_path, started=ctrl_c_default)
    try:
        stop_a_long_answer(child)
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    assert "Ctrl-C again, Ctrl-D" not in child.before


@pytest.mark.parametrize("started", [ctrl_c_default, ctrl_c_ignored], ids=["sigint-default", "sigint-ignored"])
def test_ctrl_c_stops_the_answer_and_twice_leaves(home: Path, repo: Path, tmp_path: Path, started) -> None:
    child = spawn_chat(home, repo, [LONG_ANSWER, LONG_ANSWER], tmp_path, started=started)
    try:
        stop_a_long_answer(child)
        child.sendline("/tokens")
        child.expect("generated")
        child.expect("›")
        child.sendline("again")
        child.expect("Paragraph 3 of")
        child.sendintr()
        child.expect("stopping")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 130
    assert "Paragraph 4999" not in child.before


def test_an_unreachable_server_is_said_once_in_chat(home: Path, repo: Path) -> None:
    import io
    import socket

    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = clean_env(home, PROMPT_TOOLKIT_NO_CPR="1", COLUMNS="200", LINES="40")
    child = pexpect.spawn(sys.executable, ["-m", "glmcode", "chat", "--remote", f"http://127.0.0.1:{port}/v1"],
                          cwd=str(repo), env=env, encoding="utf-8", timeout=60, dimensions=(40, 200),
                          preexec_fn=ctrl_c_default)
    child.logfile_read = screen = io.StringIO()
    try:
        child.expect("Type a request")
        child.expect("›")
        child.sendline("hello")
        child.expect("is the server running")
        child.expect("›")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    line = f"connection refused by 127.0.0.1:{port}: is the server running at http://127.0.0.1:{port}/v1?"
    assert ANSI_ESCAPE.sub("", screen.getvalue()).count(line) == 1
    assert not list((home / "data" / "glmcode" / "sessions").glob("*.jsonl")), "nothing reached the model"
