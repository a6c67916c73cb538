"""Fixtures shared by every test area."""

from __future__ import annotations

import importlib.util
import os
import signal
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Some torch modules import triton as a side effect. On a machine without CUDA the kernel
    # tests need it imported in interpreter mode first, whatever other test areas load before.
    from tests.cuda.conftest import import_triton_kernels

    import_triton_kernels()
    # The C++ CPU kernels build on first use (about a minute on two cores, then cached): once
    # here, not inside whichever test, or CLI subprocess under a timeout, first runs the model.
    # The subprocesses get a HOME of their own, so they are told where the build lies.
    from torch.utils.cpp_extension import get_default_build_root

    from glmcode.engine.cpu import kernels

    os.environ.setdefault("TORCH_EXTENSIONS_DIR", get_default_build_root())
    kernels.available()


# Ctrl-C. A test run started as a background job (`bash .ci/run &`), under nohup or by a runner
# that ignores SIGINT hands that disposition to this process and to every child it starts; the
# tests that send SIGINT set the one they rely on instead of inheriting it.

@pytest.fixture
def ctrl_c_raises():
    """In this test, SIGINT raises KeyboardInterrupt (Python's default, which an ignored SIGINT
    at startup replaces); the disposition the run started with comes back afterwards."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_default() -> None:
    """preexec_fn for a child a test interrupts: SIGINT back to its default action."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def ctrl_c_ignored() -> None:
    """preexec_fn for a child started the way a background job starts: SIGINT ignored."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def load_tiny_checkpoint_writer():
    """scripts/make_tiny_checkpoint.py as a module (scripts/ is not a package)."""
    path = ROOT / "scripts" / "make_tiny_checkpoint.py"
    spec = importlib.util.spec_from_file_location("make_tiny_checkpoint", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny GLM-4.7-Flash checkpoint (real layout, random float32 weights, GLM tokenizer)."""
    writer = load_tiny_checkpoint_writer()
    return writer.make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"))
