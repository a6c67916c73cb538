"""Fixtures shared by every test area."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # Some torch modules import triton as a side effect. On a machine without CUDA the kernel
    # tests need it imported in interpreter mode first, whatever other test areas load before.
    from tests.cuda.conftest import import_triton_kernels

    import_triton_kernels()


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
