"""Kernel tests run the Triton kernels natively on a CUDA machine and in Triton's interpreter
(TRITON_INTERPRET=1, CPU tensors) everywhere else.

Interpreter mode is fixed when triton and each @triton.jit function are first imported, so this
conftest imports them with TRITON_INTERPRET=1 at collection time and restores the variable
straight after; an autouse fixture sets it again only while a test of this directory runs. The
variable therefore never reaches other tests or their subprocesses. (On a CPU-only machine the
in-process triton stays in interpreter mode afterwards, which nothing else can notice: compiled
Triton cannot run without a GPU.)
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_MODULES = (
    "glmcode.engine.cuda.triton_mla",
    "glmcode.engine.cuda.triton_moe",
    "glmcode.engine.cuda.triton_fused",
)


def _triton_is_interpreted() -> bool:
    import triton.language.standard as standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.cdiv, InterpretedFunction)


def import_triton_kernels() -> str | None:
    """Import the Triton kernel modules; returns why the Triton tests must be skipped, or None."""
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (it is in the test extras)"
    if DEVICE.type == "cuda":
        for name in TRITON_MODULES:
            importlib.import_module(name)
        return None
    if "triton" in sys.modules and not _triton_is_interpreted():
        return "triton was imported in compiled mode before tests/cuda; run `pytest tests/cuda` alone"
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        importlib.import_module("triton.experimental.gluon")  # otherwise imported lazily at first launch
        for name in TRITON_MODULES:
            importlib.import_module(name)
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous
    return None


try:
    TRITON_SKIP_REASON = import_triton_kernels()
except ImportError as error:  # a broken or incompatible install
    TRITON_SKIP_REASON = f"triton is not importable: {error}"


@pytest.fixture(autouse=True)
def _interpreter_env(monkeypatch):
    if DEVICE.type == "cpu" and TRITON_SKIP_REASON is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def device() -> torch.device:
    return DEVICE


def _triton_module(name: str):
    if TRITON_SKIP_REASON is not None:
        pytest.skip(TRITON_SKIP_REASON)
    return sys.modules[f"glmcode.engine.cuda.{name}"]


@pytest.fixture
def triton_mla():
    return _triton_module("triton_mla")


@pytest.fixture
def triton_moe():
    return _triton_module("triton_moe")


@pytest.fixture
def triton_fused():
    return _triton_module("triton_fused")
