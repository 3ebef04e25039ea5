"""Runs tests/test_gpu_kernels.py in numba's CUDA simulator, in a subprocess.

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is imported, and it would replace every
CUDA API in the process, so the simulator gets its own interpreter and the other tests keep the
real numba. The child must pass every test and skip none (a skip there would hide a kernel).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None,
                    reason='numba-cuda is not installed: pip install -e ".[cuda]" to run the GPU kernels in the simulator')
def test_gpu_kernels_in_the_cuda_simulator():
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", str(ROOT / "tests" / "test_gpu_kernels.py")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail
