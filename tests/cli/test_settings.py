"""Layered configuration: each layer wins over the one before, and bad values name their source."""

from __future__ import annotations

from pathlib import Path

import pytest

from glmcode.errors import UsageError
from glmcode.settings import load_settings


def _env(tmp_path: Path, **values: str) -> dict[str, str]:
    return {"HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path / "xdg"), **values}


def _user_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "xdg" / "glmcode" / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_defaults_are_the_agentic_coding_ones(tmp_path: Path) -> None:
    settings = load_settings(tmp_path, {}, env=_env(tmp_path))
    assert (settings.temperature, settings.top_p, settings.approval, settings.max_turns) == (0.7, 1.0, "ask", 50)
    assert settings.remote is None and settings.thinking is True
    assert set(settings.sources.values()) == set()


def test_each_layer_overrides_the_previous_and_records_its_source(tmp_path: Path) -> None:
    user = _user_config(tmp_path, 'max_turns = 10\napproval = "auto-edit"\ntemperature = 0.2\ndevice = "cpu"\n')
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / ".glmcode.toml").write_text('max_turns = 20\napproval = "plan"\ntest_command = "make check"\n')
    env = _env(tmp_path, GLMCODE_MAX_TURNS="30", GLMCODE_DENY_COMMANDS="rm -rf *, git push*")
    settings = load_settings(repo, {"max_turns": 40, "device": None}, env=env)

    assert settings.max_turns == 40 and settings.sources["max_turns"] == "flag"
    assert settings.approval == "plan" and settings.sources["approval"] == str(repo / ".glmcode.toml")
    assert settings.temperature == 0.2 and settings.sources["temperature"] == str(user)
    assert settings.device == "cpu", "a flag left unset (None) must not override"
    assert settings.deny_commands == ["rm -rf *", "git push*"]
    assert settings.sources["deny_commands"] == "env GLMCODE_DENY_COMMANDS"
    assert settings.test_command == "make check"


def test_xdg_config_home_is_respected_and_home_config_is_the_fallback(tmp_path: Path) -> None:
    fallback = tmp_path / ".config" / "glmcode" / "config.toml"
    fallback.parent.mkdir(parents=True)
    fallback.write_text("max_turns = 7\n")
    assert load_settings(tmp_path, {}, env={"HOME": str(tmp_path)}).max_turns == 7
    _user_config(tmp_path, "max_turns = 9\n")
    assert load_settings(tmp_path, {}, env=_env(tmp_path)).max_turns == 9


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('approval = "sometimes"', "'approval'"),
        ("max_turns = 0", "'max_turns'"),
        ("temperature = 3.5", "'temperature'"),
        ('kv_cache_memory = "lots"', "'kv_cache_memory'"),
        ('kv_cache_dtype = "int4"', "'kv_cache_dtype'"),
        ('remote = "ftp://x"', "'remote'"),
        ("allow_commands = 5", "'allow_commands'"),
        ("colour = true", "unknown setting 'colour'"),
        ("max_turns = [", "not valid TOML"),
    ],
)
def test_invalid_config_values_name_the_key_and_the_file(tmp_path: Path, text: str, expected: str) -> None:
    path = _user_config(tmp_path, text + "\n")
    with pytest.raises(UsageError) as raised:
        load_settings(tmp_path, {}, env=_env(tmp_path))
    assert expected in str(raised.value) and str(path) in str(raised.value)


def test_invalid_environment_and_flag_values_name_their_source(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="GLMCODE_THINKING"):
        load_settings(tmp_path, {}, env=_env(tmp_path, GLMCODE_THINKING="maybe"))
    with pytest.raises(UsageError, match="--quantization"):
        load_settings(tmp_path, {"quantization": "int3"}, env=_env(tmp_path))


def test_values_are_parsed_into_their_types(tmp_path: Path) -> None:
    _user_config(tmp_path, 'kv_cache_memory = "8GiB"\ncontext_tokens = 65536\nquantization = "none"\n'
                           'model = "~/models/glm"\nremote = "http://127.0.0.1:8000/v1"\n')
    settings = load_settings(tmp_path, {}, env=_env(tmp_path, GLMCODE_THINKING="off", GLMCODE_KV_CACHE_DTYPE="int8"))
    assert settings.kv_cache_memory == 8 * 2**30 and settings.kv_cache_dtype == "int8"
    assert settings.context_tokens == 65536 and settings.quantization is None
    assert settings.model == str(Path("~/models/glm").expanduser())
    assert settings.remote == "http://127.0.0.1:8000/v1" and settings.thinking is False


def test_api_key_is_masked_and_not_taken_from_glmcode_env(tmp_path: Path) -> None:
    _user_config(tmp_path, 'api_key = "0123456789abcdef.secretsecret"\n')
    settings = load_settings(tmp_path, {}, env=_env(tmp_path, GLMCODE_API_KEY="from-env"))
    assert settings.api_key == "0123456789abcdef.secretsecret"
    shown = {key: value for key, value, _ in settings.shown()}
    assert shown["api_key"] == "(set)"
    assert "secret" not in repr(settings.shown())
