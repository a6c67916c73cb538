"""The AVX2 form of the CPU kernels, forced on a CPU that would build the AVX-512 one.

One process loads one form (both register the same ops), so the kernel tests run again in a
child process with ``GLMCODE_CPU_KERNELS=avx2``. Where this process already runs the AVX2 form
(a CPU without AVX-512), the suite itself covers it.
"""

import os
import subprocess
import sys

import pytest

from glmcode.engine.cpu import kernels as cpu_kernels
from glmcode.engine.cpu.features import has_avx2
from tests.conftest import ROOT

KERNEL_TESTS = ["tests/quant/test_quant_ops.py", "tests/cpu/test_prefill_kernels.py", "tests/cpu/test_fused_decode.py",
                "tests/cpu/test_cpu_ops.py", "tests/cpu/test_latent_attention.py"]  # fmt: skip


@pytest.mark.skipif(not has_avx2(), reason="this CPU has no AVX2")
@pytest.mark.skipif(cpu_kernels.build() == "avx2", reason="the suite already runs on the AVX2 form here")
def test_the_kernel_tests_pass_on_the_forced_avx2_form():
    env = os.environ | {"GLMCODE_CPU_KERNELS": "avx2"}
    form = subprocess.run([sys.executable, "-c", "from glmcode.engine.cpu import kernels; print(kernels.build())"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert form.stdout.strip() == "avx2", form.stderr
    done = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *KERNEL_TESTS],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout.splitlines()[-1]
