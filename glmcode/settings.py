"""Layered configuration: defaults < user config < repo config < environment < flags.

Every setting is one flat key. The same key is used in both TOML files
(`$XDG_CONFIG_HOME/glmcode/config.toml`, falling back to `~/.config/glmcode/config.toml`, and
`.glmcode.toml` at the repository root), as an environment variable (`GLMCODE_` + the key in
upper case, e.g. `GLMCODE_MAX_TURNS=20`; list keys take comma-separated values) and as the
override key the CLI passes for its flags. `api_key` is the exception: it comes only from a config
file here, because the remote backend reads its own key variables (ZHIPUAI_API_KEY, ZAI_API_KEY,
GLMCODE_API_KEY) from the environment. `Settings.sources` records where each value came from.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from glmcode.errors import UsageError
from glmcode.mcp.config import McpServerConfig, merge_server_tables, parse_servers
from glmcode.options import (
    APPROVAL_MODES, DTYPES, KV_CACHE_DTYPES, QUANTIZATIONS, REMOTE_PRESETS, SANDBOX_MODES, SANDBOX_OFF, ApprovalMode,
)

# The environment variables that hold glmcode's API keys (read by the remote backend).
SECRET_ENV_VARS = ("ZHIPUAI_API_KEY", "ZAI_API_KEY", "GLMCODE_API_KEY")

SECRET_KEYS = frozenset({"api_key"})
NOT_FROM_ENV = frozenset({"api_key"})


def _home(env: Mapping[str, str]) -> Path:
    return Path(env["HOME"]) if env.get("HOME") else Path.home()


def config_home(env: Mapping[str, str] = os.environ) -> Path:
    return Path(env.get("XDG_CONFIG_HOME") or _home(env) / ".config") / "glmcode"


def cache_home(env: Mapping[str, str] = os.environ) -> Path:
    """Things glmcode can rebuild: the KV disk cache."""
    return Path(env.get("XDG_CACHE_HOME") or _home(env) / ".cache") / "glmcode"


def state_home(env: Mapping[str, str] = os.environ) -> Path:
    """What running glmcode processes announce: the state files of `glmcode serve`."""
    return Path(env.get("XDG_STATE_HOME") or _home(env) / ".local" / "state") / "glmcode"


def data_home(env: Mapping[str, str] = os.environ) -> Path:
    """Sessions, REPL history and downloaded weights live here."""
    return Path(env.get("XDG_DATA_HOME") or _home(env) / ".local" / "share") / "glmcode"


def default_model_dir(env: Mapping[str, str] = os.environ) -> Path:
    """Where `glmcode model pull` puts the weights, and where glmcode looks when --model is unset."""
    return data_home(env) / "models" / "GLM-4.7-Flash"


@dataclass
class Settings:
    model: str | None = None
    remote: str | None = None
    remote_model: str = "glm-4.7-flash"
    api_key: str | None = None
    device: str = "auto"
    dtype: str | None = None
    quantization: str | None = None
    kv_cache_memory: int | None = None
    kv_cache_dtype: str | None = None
    disk_cache: bool = True
    attach_server: bool = True
    kv_cache_dir: str | None = None
    kv_cache_disk_budget: int | None = None
    weights_cache: bool = True
    context_tokens: int | None = None
    approval: str = ApprovalMode.ASK.value
    allow_commands: list[str] = field(default_factory=list)
    deny_commands: list[str] = field(default_factory=list)
    test_command: str | None = None
    sandbox: str | None = None  # None: workspace-write where commands run unasked, else off
    sandbox_network: bool = False
    sandbox_hidden: list[str] = field(default_factory=list)
    max_turns: int = 50
    thinking: bool = True
    show_thinking: bool = False
    temperature: float = 0.7
    top_p: float = 1.0
    max_output_tokens: int = 16384
    sessions_dir: str | None = None
    # [mcp_servers.NAME] tables from the config files (glmcode.mcp.config), merged name by name
    mcp_servers: dict[str, McpServerConfig] = field(default_factory=dict)
    # key -> "default" | a config file path | "env GLMCODE_X" | "flag"
    sources: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def model_dir(self) -> Path:
        return Path(self.model).expanduser() if self.model else default_model_dir()

    def kv_cache_path(self) -> Path | None:
        """The KV disk cache's directory, or None when it is off."""
        if not self.disk_cache:
            return None
        return Path(self.kv_cache_dir).expanduser() if self.kv_cache_dir else cache_home() / "kv"

    def weights_cache_path(self) -> Path | None:
        """Where quantized models are kept as built for fast loads (engine/weights/snapshot.py), or None."""
        return cache_home() / "weights" if self.disk_cache and self.weights_cache else None

    def sessions_path(self) -> Path:
        return Path(self.sessions_dir).expanduser() if self.sessions_dir else data_home() / "sessions"

    def shown(self) -> list[tuple[str, str, str]]:
        """(key, value, source) rows for `glmcode config show`; secrets are masked."""
        rows = []
        for key in KEYS:
            value = getattr(self, key)
            if key in SECRET_KEYS and value:
                text = "(set)"
            elif value is None:
                text = "(unset)"
            else:
                text = _format_value(value)
            rows.append((key, text, self.sources.get(key, "default")))
        servers = [name + ("" if server.enabled else " (disabled)") for name, server in self.mcp_servers.items()]
        rows.append(("mcp_servers", ", ".join(servers) or "(none)", self.sources.get("mcp_servers", "default")))
        return rows


def _format_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ", ".join(value) if value else "[]"
    return str(value)


# --- parsing one value --------------------------------------------------------------------

class _Invalid(ValueError):
    """A value that does not fit its key; the message says what would."""


def _text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("expected a non-empty string")
    return value.strip()


def _optional_text(value: Any) -> str | None:
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return _text(value)


def _choice(names: tuple[str, ...], optional: bool = False) -> Callable[[Any], str | None]:
    def parse(value: Any) -> str | None:
        text = _optional_text(value) if optional else _text(value)
        if text is not None and text not in names:
            raise _Invalid(f"expected one of {', '.join(names)}" + (" or none" if optional else ""))
        return text

    return parse


def _device(value: Any) -> str:
    text = _text(value)
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", text):
        raise _Invalid("expected auto, cpu, cuda, cuda:N or mps")
    return text


def _remote(value: Any) -> str | None:
    text = _optional_text(value)
    if text is not None and text not in REMOTE_PRESETS and not re.match(r"https?://", text):
        raise _Invalid(f"expected {', '.join(REMOTE_PRESETS)} or an http(s):// base URL")
    return text


def _bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
        return False
    raise _Invalid("expected true or false")


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise _Invalid("expected a positive integer")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise _Invalid("expected a positive integer") from None
    if number <= 0 or (isinstance(value, float) and value != number):
        raise _Invalid("expected a positive integer")
    return number


def _optional_positive_int(value: Any) -> int | None:
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    return _positive_int(value)


def _float_between(low: float, high: float) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise _Invalid(f"expected a number between {low} and {high}") from None
        if isinstance(value, bool) or not low <= number <= high:
            raise _Invalid(f"expected a number between {low} and {high}")
        return number

    return parse


_SIZE_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
               "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def _memory_size(value: Any) -> int | None:
    """Bytes, from an integer or a string like "8GiB" or "512 MB"."""
    if isinstance(value, str) and value.strip().lower() in ("", "none"):
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return _positive_int(value)
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise _Invalid('expected a size such as "8GiB" or "512MB"')
    size = int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
    if size <= 0:
        raise _Invalid("expected a size above zero")
    return size


def _string_list(value: Any) -> list[str]:
    if isinstance(value, str):
        value = [part for part in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise _Invalid("expected a list of strings")
    return [item.strip() for item in value if item.strip()]


def _path(value: Any) -> str | None:
    text = _optional_text(value)
    return str(Path(text).expanduser()) if text else None


PARSERS: dict[str, Callable[[Any], Any]] = {
    "model": _path,
    "remote": _remote,
    "remote_model": _text,
    "api_key": _optional_text,
    "device": _device,
    "dtype": _choice(DTYPES, optional=True),
    "quantization": _choice(QUANTIZATIONS, optional=True),
    "kv_cache_memory": _memory_size,
    "kv_cache_dtype": _choice(KV_CACHE_DTYPES, optional=True),
    "disk_cache": _bool,
    "attach_server": _bool,
    "kv_cache_dir": _path,
    "kv_cache_disk_budget": _memory_size,
    "weights_cache": _bool,
    "context_tokens": _optional_positive_int,
    "approval": _choice(APPROVAL_MODES),
    "allow_commands": _string_list,
    "deny_commands": _string_list,
    "test_command": _optional_text,
    "sandbox": _choice(SANDBOX_MODES, optional=True),
    "sandbox_network": _bool,
    "sandbox_hidden": _string_list,
    "max_turns": _positive_int,
    "thinking": _bool,
    "show_thinking": _bool,
    "temperature": _float_between(0.0, 2.0),
    "top_p": _float_between(0.0, 1.0),
    "max_output_tokens": _positive_int,
    "sessions_dir": _path,
}
# Flat keys; `mcp_servers` is a table of tables, read from the config files only (load_settings).
KEYS = tuple(f.name for f in fields(Settings) if f.name not in ("sources", "mcp_servers"))
assert set(KEYS) == set(PARSERS), "every setting needs a parser"


def env_var(key: str) -> str:
    return "GLMCODE_" + key.upper()


# --- layering -----------------------------------------------------------------------------

def user_config_path(env: Mapping[str, str] = os.environ) -> Path:
    return config_home(env) / "config.toml"


def repo_config_path(repo_root: Path) -> Path:
    return Path(repo_root) / ".glmcode.toml"


def find_repo(explicit: Path | None) -> Path:
    """The repository to work in: --repo as given, else the git root around the cwd, else the cwd."""
    if explicit is not None:
        return explicit.resolve()
    cwd = Path.cwd().resolve()
    return next((d for d in (cwd, *cwd.parents) if (d / ".git").exists()), cwd)


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as handle:
            return tomllib.load(handle)
    except FileNotFoundError:
        return {}
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"{path} is not valid TOML: {error}") from None
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror}") from None


def _apply(settings: Settings, key: str, value: Any, source: str, where: str, *, repo_file: bool = False) -> None:
    if key not in PARSERS:
        raise UsageError(f"unknown setting '{key}' in {where} (known: {', '.join(KEYS)}, mcp_servers)")
    try:
        parsed = PARSERS[key](value)
    except _Invalid as problem:
        raise UsageError(f"invalid value {value!r} for '{key}' in {where}: {problem}") from None
    if repo_file and (key, parsed) in (("sandbox", SANDBOX_OFF), ("sandbox_network", True)):
        raise UsageError(f"'{key} = {value!r}' in {where} is refused: a repository cannot loosen the sandbox "
                         "that protects you from its code; set it in your user config or with a flag")
    setattr(settings, key, parsed)
    settings.sources[key] = source


def load_settings(
    repo_root: Path | str,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
) -> Settings:
    """Merge every layer; flag overrides whose value is None are ignored (flag not given)."""
    env = os.environ if env is None else env
    settings = Settings()
    servers: dict[str, dict[str, Any]] = {}
    for path, repo_file in ((user_config_path(env), False), (repo_config_path(Path(repo_root)), True)):
        for key, value in _read_toml(path).items():
            if key == "mcp_servers":
                merge_server_tables(servers, value, str(path))
                settings.sources[key] = str(path)
                continue
            _apply(settings, key, value, str(path), str(path), repo_file=repo_file)
    settings.mcp_servers = parse_servers(servers)
    for key in KEYS:
        name = env_var(key)
        if name in env and key not in NOT_FROM_ENV:
            _apply(settings, key, env[name], f"env {name}", f"environment variable {name}")
    for key, value in (overrides or {}).items():
        if value is not None:
            _apply(settings, key, value, "flag", f"--{key.replace('_', '-')}")
    return settings
