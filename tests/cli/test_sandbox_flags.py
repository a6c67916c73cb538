"""`--sandbox`, `--sandbox-network` and the `sandbox*` settings: defaults, choices, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import Cli, assert_one_line_error
from .test_runs import DONE, FIX_SCRIPT

RUN_DATE = '</think><tool_call>run_command<arg_key>command</arg_key><arg_value>date</arg_value></tool_call>'


def init_event(result) -> dict:
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert records and records[0]["type"] == "init", result.stdout + result.stderr
    return records[0]


@pytest.mark.parametrize(("args", "expected"), [
    (["fix", "bug", "--yes"], "workspace-write"),  # fix: commands run unseen
    (["fix", "bug"], "workspace-write"),  # fix in CI, --yes or not
    (["fix", "bug", "--yes", "--approval", "yolo"], "workspace-write"),
    (["fix", "bug", "--yes", "--sandbox", "read-only"], "read-only"),
    (["fix", "bug", "--yes", "--sandbox", "off"], "off"),
    (["ask", "why?"], "off"),  # a person approves each command (and ask runs none)
    (["ask", "why?", "--sandbox", "workspace-write"], "workspace-write"),
])
def test_the_default_follows_who_sees_the_commands(cli: Cli, repo: Path, script, args, expected) -> None:
    result = cli(*args, "--replay", script([DONE]), "-o", "stream-json")
    assert result.returncode in (0, 5), result.stderr
    assert init_event(result)["sandbox"].split(" ")[0] == expected


def test_the_setting_and_the_environment_choose_too(cli: Cli, home: Path, repo: Path, script) -> None:
    (home / "config" / "glmcode").mkdir(parents=True)
    (home / "config" / "glmcode" / "config.toml").write_text('sandbox = "read-only"\nsandbox_network = true\n')
    assert init_event(cli("fix", "bug", "--replay", script([DONE]), "-o", "stream-json"))["sandbox"].startswith("read-only")
    result = cli("fix", "bug", "--replay", script([DONE]), "-o", "stream-json", env={"GLMCODE_SANDBOX": "off"})
    assert init_event(result)["sandbox"] == "off"


@pytest.mark.parametrize("line", ['sandbox = "off"', "sandbox_network = true"])
def test_a_repository_cannot_loosen_the_sandbox(cli: Cli, repo: Path, script, line: str) -> None:
    (repo / ".glmcode.toml").write_text(line + "\n")
    result = cli("fix", "bug", "--yes", "--replay", script(FIX_SCRIPT))
    assert result.returncode == 2
    message = assert_one_line_error(result)
    assert "a repository cannot loosen the sandbox" in message and ".glmcode.toml" in message


def test_a_repository_may_tighten_it(cli: Cli, repo: Path, script) -> None:
    (repo / ".glmcode.toml").write_text('sandbox = "read-only"\nsandbox_hidden = ["~/.config/other-tool"]\n')
    result = cli("fix", "bug", "--yes", "--replay", script([RUN_DATE, DONE]), "-o", "stream-json")
    assert init_event(result)["sandbox"].startswith("read-only")


def test_an_unknown_mode_is_a_usage_error(cli: Cli, repo: Path, script) -> None:
    result = cli("fix", "bug", "--sandbox", "danger-full-access", "--replay", script([DONE]))
    assert result.returncode == 2
    assert "expected one of read-only, workspace-write, off" in assert_one_line_error(result)


def test_config_show_lists_the_sandbox_settings(cli: Cli) -> None:
    shown = json.loads(cli("config", "show", "--json").stdout)
    assert shown["sandbox"]["value"] == "(unset)" and shown["sandbox_network"]["value"] == "false"
    assert shown["sandbox_hidden"]["value"] == "[]"


def test_doctor_says_which_sandbox_confines_commands(cli: Cli) -> None:
    lines = cli("doctor").stdout.splitlines()
    sandbox = [line for line in lines if "command sandbox" in line]
    assert len(sandbox) == 1, lines
    assert sandbox[0].startswith(("✓ command sandbox: bubblewrap", "! command sandbox: landlock",
                                  "✗ no command sandbox works here:"))
