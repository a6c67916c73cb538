"""The embedded GLM-4.7-Flash engine.

The public names load on first use, so importing a part of the engine that needs no torch
(such as `glmcode.engine.cpu.features`) stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_PUBLIC = {
    "LLM": "glmcode.engine.llm",
    "Completion": "glmcode.engine.llm",
    "RequestStats": "glmcode.engine.sequence",
    "StreamOutput": "glmcode.engine.llm",
    "SamplingParams": "glmcode.engine.sampler",
}

__all__ = ["LLM", "Completion", "RequestStats", "SamplingParams", "StreamOutput"]

if TYPE_CHECKING:
    from glmcode.engine.llm import LLM, Completion, StreamOutput
    from glmcode.engine.sampler import SamplingParams
    from glmcode.engine.sequence import RequestStats


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'glmcode.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
