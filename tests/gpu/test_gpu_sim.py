"""Runs tests/gpu/test_gpu_kernels.py in numba's CUDA simulator, in a subprocess, and compiles every
kernel launch it made for a real GPU (sm_90) with gpu.compile_check.

NUMBA_ENABLE_CUDASIM must be set before numba.cuda is imported, and it would replace every
CUDA API in the process, so the simulator gets its own interpreter and the other tests keep the
real numba. The child must pass every test and skip none (a skip there would hide a kernel).
The simulator runs kernels as Python and accepts code CUDA refuses; the compile check is what
catches that without a GPU (it needs NVVM and NVRTC: pip install -e ".[ptx]").
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from support import REPO as ROOT  # noqa: E402
needs_numba_cuda = pytest.mark.skipif(
    importlib.util.find_spec("numba_cuda") is None,
    reason='numba-cuda is not installed: pip install -e ".[cuda]" to run the GPU kernels in the simulator')

CHILD = """
import sys, pytest, gpu.compile_check as cc
cc.record_launches(sys.argv[1])
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "-rs", sys.argv[2]]))
"""


@pytest.fixture(scope="module")
def simulator_run(tmp_path_factory):
    launches = tmp_path_factory.mktemp("gpu_sim") / "launches.json"
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1")
    proc = subprocess.run([sys.executable, "-c", CHILD, str(launches), str(ROOT / "tests" / "gpu" / "test_gpu_kernels.py")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    return proc, launches


@needs_numba_cuda
def test_gpu_kernels_in_the_cuda_simulator(simulator_run):
    proc, _ = simulator_run
    tail = proc.stdout[-4000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, tail
    assert " passed" in proc.stdout and "skipped" not in proc.stdout, tail


def _ptx_toolchain() -> str | None:
    """Why PTX cannot be compiled here (None when NVVM and NVRTC load)."""
    if importlib.util.find_spec("numba_cuda") is None:
        return "numba-cuda is not installed"
    probe = ("from numba import cuda, float32\n"
             "def k(a):\n    a[0] = 1\n"
             "cuda.compile_ptx(k, (float32[:],), cc=(9, 0))")
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    return None if proc.returncode == 0 else proc.stderr.strip().splitlines()[-1][:300]


@needs_numba_cuda
def test_every_launched_kernel_compiles_for_a_real_gpu(simulator_run):
    why = _ptx_toolchain()
    if why:
        pytest.skip(f'no NVVM/NVRTC to compile PTX ({why}): pip install -e ".[ptx]"')
    _, launches = simulator_run
    rows = json.loads(launches.read_text())
    names = {r["name"] for r in rows}
    assert {"gemv_kernel", "_gemm_kernel", "_gptq_block_kernel", "_grid_kernel", "gemv_quad_kernel"} <= names, sorted(names)
    proc = subprocess.run([sys.executable, "-m", "gpu.compile_check", str(launches)], cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert f"{len(rows)} of {len(rows)} recorded kernel launches compile for sm_90" in proc.stdout


@needs_numba_cuda
def test_linked_cuda_c_compiles_for_sm_90():
    """gpu/packed_quad.cu (the W2 GEMV's inner step) compiles with NVRTC, the quad GEMV kernels
    calling it compile with NVVM, and their extern declaration has the source's parameter types.
    The simulator never launches these kernels (it cannot run C), so this is their only check
    without a GPU."""
    why = _ptx_toolchain()
    if why:
        pytest.skip(f'no NVVM/NVRTC to compile PTX ({why}): pip install -e ".[ptx]"')
    proc = subprocess.run([sys.executable, "-m", "gpu.compile_check"], cwd=ROOT, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "linked CUDA C: 5 of 5 checks pass for sm_90" in proc.stdout, proc.stdout[-3000:]
