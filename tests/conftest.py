"""Shared test setup: tests/ on sys.path (for ``support``), the hypothesis profile, and under
numba's CUDA simulator (NUMBA_ENABLE_CUDASIM=1) a thread-safe ``cuda.shared.array``.

Tests are grouped by package: reference/ (decoupleq_ref's layer solver), numba/ (kernels_numba),
gpu/ (the CUDA kernels, in the simulator without a GPU), validate/ (the oracle), model/ (the model
pipeline and CLI)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from hypothesis import HealthCheck, settings

sys.path.insert(0, str(Path(__file__).resolve().parent))

# Solves and simulated kernels take variable time on a loaded 2-core machine: no per-example
# deadline, no too-slow health check. Tests set max_examples (and derandomize) themselves.
settings.register_profile("decoupleq", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "decoupleq"))

if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
    import threading

    import numpy as np
    from numba.cuda.simulator import kernelapi

    _SHARED_LOCK = threading.Lock()
    _SHARED_ORIGINAL = kernelapi.FakeCUDAShared.array

    def _shared_array_locked(self, shape, dtype, alignment=None):
        """The simulator's cuda.shared.array, made thread-safe: it looks up the per-block
        allocation of the calling line and creates it if missing without a lock, so two
        simulated threads can each create their own copy and stop sharing memory (seen as
        garbage results that depend on thread scheduling)."""
        if shape == 0 or alignment is not None:
            return _SHARED_ORIGINAL(self, shape, dtype, alignment)
        frame = sys._getframe(1)
        caller = (frame.f_code.co_filename, frame.f_lineno)
        with _SHARED_LOCK:
            res = self._allocations.get(caller)
            if res is None:
                dt = kernelapi.numpy_support.as_dtype(dtype) if isinstance(dtype, kernelapi.types.Type) else dtype
                res = self._allocations[caller] = np.empty(shape, dt)
        return res

    kernelapi.FakeCUDAShared.array = _shared_array_locked
    # Every simulated CUDA thread is a Python thread; a short GIL switch interval makes the
    # barrier-heavy kernels ~4× faster to simulate.
    sys.setswitchinterval(1e-4)
