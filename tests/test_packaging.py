"""What a newcomer meets before any glmcode code runs: the package metadata and the test run."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_building_the_metadata_raises_no_deprecation_warning(tmp_path: Path) -> None:
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO_ROOT / name, tmp_path / name)
    (tmp_path / "glmcode").mkdir()
    (tmp_path / "glmcode" / "__init__.py").write_text("")
    (tmp_path / "out").mkdir()
    build = ("import setuptools.build_meta as backend, sys; "
             "print(backend.prepare_metadata_for_build_wheel(sys.argv[1]))")
    result = subprocess.run([sys.executable, "-W", "error", "-c", build, str(tmp_path / "out")],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    assert "Deprecat" not in result.stderr, result.stderr
    metadata = next((tmp_path / "out").glob("*.dist-info")) / "METADATA"
    assert "License-Expression: Apache-2.0" in metadata.read_text()


def test_the_default_run_says_why_a_test_was_skipped(tmp_path: Path) -> None:
    test_file = tmp_path / "test_needs_something.py"
    test_file.write_text("import pytest\n\n\ndef test_it():\n    pytest.skip('put the thing at /some/where')\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-c", str(REPO_ROOT / "pyproject.toml"), "--rootdir", str(tmp_path),
         "-p", "no:cacheprovider", str(test_file)],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SKIPPED [1]" in result.stdout and "put the thing at /some/where" in result.stdout


def test_the_template_tests_name_what_to_put_where() -> None:
    from tests.chat_format.reference import TEMPLATE_MISSING, TEMPLATE_PATH

    assert str(TEMPLATE_PATH) in TEMPLATE_MISSING and "zai-org/GLM-4.7-Flash" in TEMPLATE_MISSING
