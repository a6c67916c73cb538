"""The remote backend: the Zhipu / Z.ai API or any OpenAI-compatible server (vLLM, SGLang, llama.cpp)."""

from glmcode.backends.remote.backend import DEFAULT_MODEL, RemoteBackend, RetryPolicy
from glmcode.backends.remote.endpoint import PRESETS, RemoteEndpoint, resolve_endpoint

__all__ = ["DEFAULT_MODEL", "PRESETS", "RemoteBackend", "RemoteEndpoint", "RetryPolicy", "resolve_endpoint"]
