"""Numba CUDA import guard and device probes.

Every kernel module takes ``cuda`` and ``jit`` from here. Without numba-cuda the package still
imports (``jit`` then returns stubs that raise ImportError when called), so
``decoupleq_ref.backends`` can ask ``gpu.available()`` on any machine.

Two questions with different answers under the simulator (``NUMBA_ENABLE_CUDASIM=1``):

* ``available()``: a real CUDA GPU is usable. False in the simulator, so the simulator can never
  make ``cuda`` the default backend.
* ``can_run()``: the kernels can execute here (real GPU or simulator); what the tests need.
"""

from __future__ import annotations

import functools
import os

import numpy as np

INSTALL_HINT = ('the gpu backend needs numba-cuda and a CUDA GPU: pip install "decoupleq-ref[cuda]" '
                "(or use the numpy/numba backends)")

# numba-cuda 0.30 registers an overload for np.row_stack when it first compiles a kernel;
# NumPy 2.5 removed that alias of np.vstack, so every compilation failed (seen on an H200 with
# numpy 2.5.2 + numba-cuda 0.30.4). Restore the alias before numba-cuda looks for it.
if not hasattr(np, "row_stack"):  # pragma: no cover - depends on the installed NumPy
    np.row_stack = np.vstack

try:  # pragma: no cover - both states are exercised by tests/gpu/test_gpu_sim.py
    from numba import cuda

    HAVE_NUMBA_CUDA = True
except ImportError:
    cuda = None
    HAVE_NUMBA_CUDA = False


def simulator() -> bool:
    """True when numba runs kernels in its Python CUDA simulator (NUMBA_ENABLE_CUDASIM=1)."""
    if not HAVE_NUMBA_CUDA:
        return False
    try:  # numba-cuda keeps its own config module; numba's built-in cuda uses numba.core's
        from numba.cuda.core import config
    except ImportError:
        from numba.core import config

    return bool(config.ENABLE_CUDASIM) or os.environ.get("NUMBA_ENABLE_CUDASIM", "0") not in ("", "0")


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when a real CUDA GPU is usable through numba-cuda (never under the simulator)."""
    if not HAVE_NUMBA_CUDA or simulator():
        return False
    try:
        return bool(cuda.is_available())
    except Exception:  # driver present but broken: treat as no GPU
        return False


def can_run() -> bool:
    """True when the kernels can execute: a real GPU, or the simulator."""
    return HAVE_NUMBA_CUDA and (simulator() or available())


def require() -> None:
    """Raise the ImportError that says how to get a runnable CUDA setup."""
    if not can_run():
        raise ImportError(INSTALL_HINT)


if HAVE_NUMBA_CUDA:
    def jit(*args, **kwargs):
        """cuda.jit; lazily compiled on first launch, so importing never needs a GPU."""
        return cuda.jit(*args, **kwargs)
else:
    def jit(*args, **kwargs):
        def wrap(fn):
            @functools.wraps(fn)
            def stub(*a, **k):
                raise ImportError(INSTALL_HINT)

            return _Stub(stub)

        if args and callable(args[0]):
            return wrap(args[0])
        return wrap


class _Stub:
    """Stands in for a kernel or device function when numba-cuda is missing."""

    def __init__(self, fn):
        self._fn = fn

    def __getitem__(self, launch_config):
        return self._fn

    def __call__(self, *a, **k):
        return self._fn(*a, **k)


def blocks(n: int, per_block: int) -> int:
    """Grid size covering n items with per_block items per block (at least 1)."""
    return max(1, -(-n // per_block))
