"""Custom slash commands from Markdown files: the repository's and the user's, argument
substitution, a clash with a built-in, a missing command and a broken file, through the REPL
(in a pseudo-terminal) and through `glmcode run`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from glmcode.custom_commands import load_commands

from .conftest import Cli, assert_one_line_error
from .test_repl import spawn_chat
from .test_runs import session_user_messages

pexpect = pytest.importorskip("pexpect")

ANSWER = "Done.</think>Reviewed."


@pytest.fixture
def commands(home: Path, repo: Path) -> Path:
    """A repo with commands of its own, and a user with commands of theirs."""
    repo_dir = repo / ".glmcode" / "commands"
    (repo_dir / "git").mkdir(parents=True)
    (repo_dir / "review.md").write_text("---\ndescription: Review a file for bugs\nargument-hint: FILE [FOCUS]\n---\n"
                                        "Review $1 for bugs, above all $2.\n(All I typed: $ARGUMENTS)\n")
    (repo_dir / "git" / "summary.md").write_text("# Summarize the last commits\nSummarize the last $1 commits.\n")
    (repo_dir / "undo.md").write_text("Undo everything I did today.\n")  # clashes with the built-in /undo
    (repo_dir / "standup.md").write_text("Write the team's standup.\n")  # overrides the user's
    user_dir = home / "config" / "glmcode" / "commands"
    user_dir.mkdir(parents=True)
    (user_dir / "standup.md").write_text("Write my standup.\n")
    (user_dir / "explain.md").write_text("Explain the code I point at.\n")
    (user_dir / "broken.md").write_bytes(b"\xff\xfe not text")
    return repo


def test_the_loader_merges_scopes_and_reports_what_it_leaves_out(commands: Path, home: Path) -> None:
    found = load_commands(commands, builtins=["/undo", "/help"], env={"XDG_CONFIG_HOME": str(home / "config")})
    assert sorted(found.commands) == ["explain", "git:summary", "review", "standup"]
    assert found.get("standup").body.strip() == "Write the team's standup."
    assert found.get("standup").overrides == home / "config" / "glmcode" / "commands" / "standup.md"
    assert found.get("explain").scope == "user" and found.get("review").argument_hint == "FILE [FOCUS]"
    assert any(p.startswith("/undo (") and "is a built-in command; rename the file" in p for p in found.problems)
    assert any(p.endswith("broken.md: skipped: not UTF-8 text") for p in found.problems)
    review = found.get("review")
    assert review.render('src/app.py "error handling"') == (
        'Review src/app.py for bugs, above all error handling.\n(All I typed: src/app.py "error handling")')
    assert found.get("explain").render("the parser") == "Explain the code I point at.\n\nArguments: the parser"


def test_glmcode_run_renders_the_command_and_runs_the_agent(cli: Cli, commands: Path, tmp_path: Path) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps([ANSWER]))
    result = cli("run", "review", "calc.py", "the sign of add", "--replay", str(script))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "Reviewed."
    result = cli("run", "git:summary", "3", "--replay", str(script), "-o", "json")
    assert result.returncode == 0 and json.loads(result.stdout)["status"] == "done"
    assert sorted(session_user_messages(cli.home)) == [  # both runs may share a second: sorted
        "# Summarize the last commits\nSummarize the last 3 commits.",
        "Review calc.py for bugs, above all the sign of add.\n(All I typed: calc.py the sign of add)",
    ]


def test_glmcode_run_refuses_missing_and_clashing_commands_in_one_line(cli: Cli, commands: Path) -> None:
    missing = cli("run", "deploy")
    assert missing.returncode == 2
    line = assert_one_line_error(missing)
    assert "no custom command 'deploy'" in line and ".glmcode/commands/deploy.md" in line
    assert "explain, git:summary, review, standup" in line
    clash = cli("run", "undo")
    assert clash.returncode == 2 and "is a built-in command; rename the file" in assert_one_line_error(clash)


def test_the_repl_lists_runs_and_reports_custom_commands(home: Path, commands: Path, tmp_path: Path) -> None:
    child = spawn_chat(home, commands, [ANSWER, ANSWER], tmp_path)
    try:
        said = " ".join(child.before.split())
        assert "/undo (" in said and "is a built-in command; rename the file" in said, "the clash is said at start"
        child.expect("›")
        child.sendline("/help")
        child.expect("custom commands")
        child.expect(r"/review\s+Review a file for bugs  \(args: FILE \[FOCUS\]\)  \[repo\]")
        child.expect(r"/standup\s+Write the team's standup.  \[repo, overrides the user command\]")
        child.expect(r"skipped: not UTF-8 text")
        child.expect("›")
        child.sendline("/review calc.py 'the sign'")
        child.expect("/review: Review a file for bugs")
        child.expect("Reviewed.")
        child.expect("›")
        child.sendline("/undo")
        child.expect("nothing to undo"), "the built-in /undo still answers"
        child.expect("›")
        child.sendline("/deploy now")
        child.expect("unknown command /deploy")
        child.expect("›")
        (commands / ".glmcode" / "commands" / "deploy.md").write_text("Deploy $ARGUMENTS.\n")
        child.sendline("/deploy now")
        child.expect("Reviewed."), "a command added while the REPL runs works at once"
        child.expect("›")
        child.sendline("/exit")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert session_user_messages(home) == ["Review calc.py for bugs, above all the sign.\n"
                                           "(All I typed: calc.py 'the sign')", "Deploy now."]
