"""Backend switch: the same quantize_layer(W, H, cfg) from numpy (reference), numba or cuda."""

from __future__ import annotations

import importlib
from typing import Callable

import numpy as np

from .config import QuantConfig
from .format import QuantResult

BACKENDS: tuple[str, ...] = ("numpy", "numba", "cuda")
_MODULES = {"numpy": "decoupleq_ref", "numba": "kernels_numba", "cuda": "gpu"}
_INSTALL_HINT = {"numba": 'pip install "decoupleq-ref[numba]"',
                 "cuda": 'pip install "decoupleq-ref[cuda]" and a CUDA GPU'}

Solver = Callable[[np.ndarray, np.ndarray, QuantConfig], QuantResult]


def _backend_module(name: str):
    """The backend's module, or None where it does not import (its package is not installed)."""
    try:
        return importlib.import_module(_MODULES[name])
    except ImportError:
        return None


def backend_available(name: str) -> bool:
    """True if the backend imports and says it can run here (``available()`` where defined)."""
    if name == "numpy":
        return True
    mod = _backend_module(name)
    probe = getattr(mod, "available", None)
    return hasattr(mod, "quantize_layer") and (probe is None or bool(probe()))


def backend_runnable(name: str) -> bool:
    """True if the backend can execute here when asked for by name: available, or (cuda) the
    Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which default_backend() never picks."""
    probe = getattr(_backend_module(name), "can_run", None)
    return backend_available(name) or (probe is not None and bool(probe()))


def default_backend() -> str:
    """The fastest backend that can run here: cuda, then numba, then numpy."""
    for name in ("cuda", "numba"):
        if backend_available(name):
            return name
    return "numpy"


def get_solver(name: str | None = None) -> Solver:
    """quantize_layer of the named backend (None = default_backend())."""
    name = name or default_backend()
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {BACKENDS}")
    if not backend_runnable(name):
        raise ValueError(f"backend: {name!r} is not available on this machine; install it with "
                         f"{_INSTALL_HINT[name]}, or pass --backend numpy")
    return importlib.import_module(_MODULES[name]).quantize_layer
