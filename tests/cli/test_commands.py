"""The CLI as a script sees it: exit codes, one-line errors, no colour codes when piped."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from glmcode.cli import normalize_remote_flag
from glmcode.console import validate_event

from .conftest import ANSI_ESCAPE, Cli, assert_one_line_error, clean_env, write_checkpoint


def test_help_and_version_exit_0_without_colour_codes(cli: Cli) -> None:
    result = cli("--help")
    assert result.returncode == 0
    assert "ask" in result.stdout and "fix" in result.stdout and "chat" in result.stdout
    assert not ANSI_ESCAPE.search(result.stdout)
    assert cli("--version").stdout.startswith("glmcode ")
    assert cli().returncode == 0, "no command prints the help"


def _command_paths() -> list[list[str]]:
    import typer

    from glmcode.cli import app

    def walk(command, path):
        yield path
        for name, sub in getattr(command, "commands", {}).items():
            if not sub.hidden:
                yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


def test_every_help_reads_like_git(cli: Cli) -> None:
    paths = _command_paths()
    assert ["ask"] in paths and ["model", "quantize"] in paths
    with ThreadPoolExecutor(max_workers=4) as pool:  # each is its own process: run a few at once
        results = list(pool.map(lambda path: cli(*path, "--help"), paths))
    for path, result in zip(paths, results):
        assert result.returncode == 0, (path, result.stderr)
        usage = result.stdout.splitlines()[0]
        assert usage.startswith(" ".join(["Usage: glmcode", *path, "[OPTIONS]"])), usage
        for odd in ("<bool>", "<str>", "<int", "{", "x>=", "╭"):
            assert odd not in result.stdout, (path, odd, result.stdout)
    ask = cli("ask", "--help").stdout
    assert ask.startswith("Usage: glmcode ask [OPTIONS] PROMPT\n")
    assert re.search(r"\n  --no-think +Answer without thinking first\.\n", ask), "a flag takes no value"
    assert re.search(r"\n  --max-turns N +Most agent steps for this request\.\n", ask)
    assert "-q, --quantization SCHEME" in ask and "-o, --output-format FORMAT" in ask


def test_usage_errors_exit_2(cli: Cli) -> None:
    for args in (["ask"], ["fix"], ["ask", "hi", "--max-turns", "0"], ["ask", "hi", "--bogus"],
                 ["model", "quantize", "a", "b", "--bits", "3"], ["nonsense"]):
        result = cli(*args)
        assert result.returncode == 2, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert not ANSI_ESCAPE.search(result.stderr)


def test_bad_output_format_and_bad_setting_values_exit_2_with_one_line(cli: Cli) -> None:
    result = cli("ask", "hi", "--output-format", "xml")
    assert result.returncode == 2
    assert "--output-format" in assert_one_line_error(result)

    result = cli("fix", "the bug", "--approval", "sometimes")
    assert result.returncode == 2
    assert "'approval'" in assert_one_line_error(result)


def test_a_broken_config_file_exits_2_naming_the_file(cli: Cli, workdir: Path) -> None:
    (workdir / ".glmcode.toml").write_text("max_turns = 'many'\n")
    result = cli("ask", "hi")
    assert result.returncode == 2
    line = assert_one_line_error(result)
    assert "max_turns" in line and str(workdir / ".glmcode.toml") in line


def test_no_weights_says_how_to_get_them_and_exits_3(cli: Cli) -> None:
    for args in (["ask", "what does this do?"], ["fix", "tests fail"]):
        result = cli(*args)
        assert result.returncode == 3, result.stderr
        line = assert_one_line_error(result)
        assert "glmcode model pull" in line and "--remote" in line and "--model" in line


def test_no_weights_in_json_mode_still_prints_a_valid_result(cli: Cli) -> None:
    result = cli("ask", "hi", "--output-format", "json")
    assert result.returncode == 3
    record = json.loads(result.stdout)
    assert validate_event(record) == []
    assert record["status"] == "error" and record["exit_code"] == 3 and "model pull" in record["error"]


def test_an_incomplete_checkpoint_exits_3_naming_what_is_missing(cli: Cli, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    (checkpoint / "model-00001-of-00001.safetensors").unlink()
    result = cli("ask", "hi", "--model", str(checkpoint))
    assert result.returncode == 3
    assert "weight shards missing" in assert_one_line_error(result)


def test_a_model_path_that_is_a_file_exits_3_with_one_line(cli: Cli, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    result = cli("ask", "hi", "--model", str(checkpoint / "config.json"))
    assert result.returncode == 3
    assert "is not a directory" in assert_one_line_error(result)


def test_model_info_describes_a_checkpoint(cli: Cli, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    result = cli("model", "info", str(checkpoint), "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["model_type"] == "glm4_moe_lite" and info["n_routed_experts"] == 4 and info["problems"] == []
    text = cli("model", "info", str(checkpoint))
    assert "num_hidden_layers: 2" in text.stdout
    missing = cli("model", "info", str(tmp_path))
    assert missing.returncode == 3 and "missing config.json" in assert_one_line_error(missing)


def test_model_info_without_weights_gives_the_same_line_as_every_command(cli: Cli) -> None:
    default = cli.home / "data" / "glmcode" / "models" / "GLM-4.7-Flash"
    info = cli("model", "info")
    assert info.returncode == 3
    line = assert_one_line_error(info)
    assert line.startswith(f"glmcode: no GLM-4.7-Flash weights found at {default}. "
                           "Download them with `glmcode model pull` (about 60 GB), point --model")
    assert line.count(str(default)) == 1
    assert assert_one_line_error(cli("ask", "hi")) == line


def test_a_model_path_that_is_a_file_names_it_once(cli: Cli, tmp_path: Path) -> None:
    config = write_checkpoint(tmp_path / "ckpt") / "config.json"
    expected = f"glmcode: {config} is not a directory: --model takes a checkpoint directory"
    for args in (["model", "info", str(config)], ["ask", "hi", "--model", str(config)]):
        result = cli(*args)
        assert result.returncode == 3
        assert assert_one_line_error(result) == expected


def test_model_pull_offline_says_so_and_exits_3(cli: Cli, tmp_path: Path) -> None:
    result = cli("model", "pull", "--dir", str(tmp_path / "weights"))
    assert result.returncode == 3
    line = assert_one_line_error(result)
    assert "cannot download zai-org/GLM-4.7-Flash" in line and "HF_HUB_OFFLINE" in line


def test_doctor_reports_each_check_and_the_fix(cli: Cli, tmp_path: Path) -> None:
    result = cli("doctor")
    assert result.returncode == 3, "nothing to run: no weights, no key"
    lines = result.stdout.splitlines()
    assert any(line.startswith("✓ torch") for line in lines)
    assert any(line.startswith("✗ no model at") and "glmcode model pull" in line for line in lines)
    assert any("no remote API key set" in line and "ZHIPUAI_API_KEY" in line for line in lines)
    assert any("int4" in line for line in lines)
    # on a CPU machine: whether our kernels can be built, from the CPU's flags
    assert any("CPU kernels can be built" in line or "AVX-512 VNNI" in line or "ninja" in line for line in lines)

    checkpoint = write_checkpoint(tmp_path / "ckpt")
    result = cli("doctor", "--model", str(checkpoint), env={"ZAI_API_KEY": "k" * 20})
    assert result.returncode == 0
    assert f"✓ model found at {checkpoint}" in result.stdout
    assert "✓ remote API key set (ZAI_API_KEY)" in result.stdout
    assert "k" * 20 not in result.stdout


def test_doctor_shows_what_it_is_checking_on_a_terminal(home: Path, workdir: Path) -> None:
    import sys

    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(sys.executable, ["-m", "glmcode", "doctor"], cwd=str(workdir), env=clean_env(home),
                          encoding="utf-8", timeout=60, dimensions=(40, 200))
    try:
        child.expect("✓ Python")
        child.expect("loading torch, looking for a CUDA GPU…")
        child.expect("✓ torch")
        child.expect("No model to run")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 3


def test_doctor_gives_the_install_line_for_this_systems_package_manager(tmp_path: Path, monkeypatch) -> None:
    from glmcode.doctor import install_line

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    assert "pip install ninja" in install_line(["c++", "ninja"])
    dnf = bin_dir / "dnf"
    dnf.write_text("#!/bin/sh\n")
    dnf.chmod(0o755)
    assert install_line(["c++", "ninja"]).endswith("dnf install gcc-c++ ninja-build")
    assert install_line(["ninja"]).endswith("dnf install ninja-build")


def test_config_show_prints_values_with_sources_and_masks_secrets(cli: Cli, home: Path, workdir: Path) -> None:
    user_config = home / "config" / "glmcode" / "config.toml"
    user_config.parent.mkdir(parents=True)
    user_config.write_text('api_key = "abcdef0123456789.topsecretvalue"\nmax_turns = 12\n')
    (workdir / ".glmcode.toml").write_text('approval = "auto-edit"\n')
    result = cli("config", "show", "--json", env={"GLMCODE_TEMPERATURE": "0.3"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["max_turns"] == {"value": "12", "source": str(user_config)}
    assert shown["approval"] == {"value": "auto-edit", "source": str(workdir / ".glmcode.toml")}
    assert shown["temperature"] == {"value": "0.3", "source": "env GLMCODE_TEMPERATURE"}
    assert shown["api_key"]["value"] == "(set)"
    table = cli("config", "show")
    assert "topsecret" not in table.stdout + result.stdout
    assert "max_turns" in table.stdout and str(user_config) in table.stdout
    assert not ANSI_ESCAPE.search(table.stdout)


def test_chat_needs_a_terminal(cli: Cli) -> None:
    result = cli("chat")
    assert result.returncode == 2
    assert "glmcode ask" in assert_one_line_error(result)


def test_fix_from_empty_stdin_is_a_usage_error(cli: Cli) -> None:
    result = cli("fix", "-", input="")
    assert result.returncode == 2
    assert "stdin" in assert_one_line_error(result)


def test_quantize_bad_bits_and_a_missing_source_are_clear_errors(cli: Cli, tmp_path: Path) -> None:
    checkpoint = write_checkpoint(tmp_path / "ckpt")
    result = cli("model", "quantize", str(checkpoint), str(tmp_path / "out"), "--bits", "3")
    assert result.returncode == 2 and "--bits must be 4 or 8" in assert_one_line_error(result)
    result = cli("model", "quantize", str(checkpoint), str(tmp_path / "out"), "--linear-bits", "2")
    assert result.returncode == 2 and "--linear-bits must be 4 or 8" in assert_one_line_error(result)
    result = cli("model", "quantize", str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert result.returncode == 3 and "nowhere" in assert_one_line_error(result)
    assert not (tmp_path / "out").exists()


def test_bare_remote_means_zhipu_and_keeps_the_prompt() -> None:
    assert normalize_remote_flag(["ask", "--remote", "why?"]) == ["ask", "--remote=zhipu", "why?"]
    assert normalize_remote_flag(["ask", "why?", "--remote"]) == ["ask", "why?", "--remote=zhipu"]
    assert normalize_remote_flag(["ask", "--remote", "zai", "q"]) == ["ask", "--remote", "zai", "q"]
    assert normalize_remote_flag(["ask", "--remote", "http://h:8000/v1"]) == ["ask", "--remote", "http://h:8000/v1"]
    assert normalize_remote_flag(["ask", "--", "--remote"]) == ["ask", "--", "--remote"]
