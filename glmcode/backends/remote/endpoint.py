"""Where a remote model lives: the hosted presets (zhipu, zai) or any OpenAI-compatible base URL."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping
from urllib.parse import urlsplit

from glmcode.errors import AuthError, UsageError
from glmcode.options import ZAI, ZHIPU

GENERIC_KEY_VARIABLE = "GLMCODE_API_KEY"


@dataclass(frozen=True)
class _Preset:
    base_url: str
    key_variable: str
    key_page: str


PRESETS: dict[str, _Preset] = {
    ZHIPU: _Preset("https://open.bigmodel.cn/api/paas/v4", "ZHIPUAI_API_KEY", "https://open.bigmodel.cn"),
    ZAI: _Preset("https://api.z.ai/api/paas/v4", "ZAI_API_KEY", "https://z.ai"),
}

# Hosts that speak the hosted dialect (thinking: {...}, tool_stream) whatever path the user gives,
# e.g. the Coding Plan URLs; mapped to the preset whose key they take.
_HOSTED_HOSTS = {"open.bigmodel.cn": ZHIPU, "api.z.ai": ZAI}


@dataclass(frozen=True)
class RemoteEndpoint:
    """One OpenAI-compatible chat-completions endpoint.

    hosted: the Zhipu / Z.ai API (its own request dialect and error codes), as opposed to a
    self-hosted vLLM / SGLang / llama.cpp server. key_variable: the environment variable a user
    sets to fix a missing or wrong key. The key itself is kept out of repr().
    """

    name: str
    base_url: str
    key_variable: str
    hosted: bool
    api_key: str | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        """The host (and port) for messages: 'open.bigmodel.cn', '127.0.0.1:8000'."""
        return urlsplit(self.base_url).netloc

    @property
    def chat_url(self) -> str:
        return f"{self.base_url}/chat/completions"


def resolve_endpoint(
    spec: str | None, env: Mapping[str, str] = os.environ, *, api_key: str | None = None
) -> RemoteEndpoint:
    """Turn a `--remote` value into an endpoint.

    spec: None, "" or "zhipu" (open.bigmodel.cn, key ZHIPUAI_API_KEY), "zai" (api.z.ai, key
    ZAI_API_KEY), or a base URL such as http://host:8000/v1 (key GLMCODE_API_KEY, optional).
    api_key: a key from the config file; it wins over the environment.
    """
    preset_name = (spec or ZHIPU).strip().lower()
    if preset_name in PRESETS:
        preset = PRESETS[preset_name]
        return _hosted(preset_name, preset.base_url, env, api_key)
    base_url = _normalise_url(spec or "")
    hosted_preset = _HOSTED_HOSTS.get(urlsplit(base_url).hostname or "")
    if hosted_preset:
        return _hosted(hosted_preset, base_url, env, api_key)
    key = api_key or env.get(GENERIC_KEY_VARIABLE) or None
    return RemoteEndpoint("custom", base_url, GENERIC_KEY_VARIABLE, hosted=False, api_key=key)


def _hosted(preset_name: str, base_url: str, env: Mapping[str, str], api_key: str | None) -> RemoteEndpoint:
    preset = PRESETS[preset_name]
    key = api_key or env.get(preset.key_variable) or None
    if not key:
        raise AuthError(
            f"no API key for {preset_name} ({urlsplit(base_url).netloc}): "
            f"set {preset.key_variable} (create a key at {preset.key_page})"
        )
    return RemoteEndpoint(preset_name, base_url, preset.key_variable, hosted=True, api_key=key)


def _normalise_url(spec: str) -> str:
    url = spec.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        known = ", ".join(PRESETS)
        looks_like_address = "://" not in url and any(mark in url for mark in ":./")
        hint = f"http://{url}" if looks_like_address else "http://host:8000/v1"
        raise UsageError(f"unknown remote '{spec}': use one of {known}, or a base URL such as {hint}")
    if not urlsplit(url).hostname:
        raise UsageError(f"remote URL '{spec}' has no host: use a base URL such as http://host:8000/v1")
    # Accept a full endpoint URL pasted from server docs.
    return url.removesuffix("/chat/completions")
