"""The backend registry: the same quantize_layer(W, H, cfg) from numpy (reference), numba or cuda.

This is the only list of backends; the CLI (``--backend``), the model pipeline and validate
(``compare``, ``decoupleq validate --impl``) all resolve names here. Adding a backend is one
entry in ``_MODULES`` (a package with ``quantize_layer`` and, optionally, ``available()``,
``can_run()`` and ``unavailable_reason()``) plus its install hint.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Callable

import numpy as np

from .config import QuantConfig
from .format import QuantResult

BACKENDS: tuple[str, ...] = ("numpy", "numba", "cuda")
#: Other accepted spellings: validate and the docs call the float64 reference "reference".
ALIASES: dict[str, str] = {"reference": "numpy"}
_MODULES = {"numpy": "decoupleq_ref", "numba": "kernels_numba", "cuda": "gpu"}
_INSTALL_HINT = {"numba": 'pip install "decoupleq-ref[numba]"',
                 "cuda": 'pip install "decoupleq-ref[cuda]" and a CUDA GPU'}

Solver = Callable[[np.ndarray, np.ndarray, QuantConfig], QuantResult]


def canonical_backend(name: str) -> str:
    """The registry's name for ``name`` (an alias such as "reference" -> "numpy"); ValueError
    naming the choices for an unknown one."""
    name = ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"backend: unknown backend {name!r}; choose one of {BACKENDS} "
                         f"(or an alias: {', '.join(ALIASES)})")
    return name


def _backend_module(name: str) -> tuple[ModuleType | None, str]:
    """(module, "") or (None, why) where it does not import (its package is not installed)."""
    mod_name = _MODULES[name]
    try:
        return importlib.import_module(mod_name), ""
    except ImportError as e:
        return None, f"cannot import {mod_name}: {e}"


def _probe(mod: ModuleType, fn: str) -> bool:
    probe = getattr(mod, fn, None)
    return probe is not None and bool(probe())


def backend_status(name: str) -> tuple[bool, str]:
    """(runnable, reason): whether backend ``name`` can execute here when asked for by name —
    it imports, defines quantize_layer and ``available()`` (or, for cuda, the Numba CUDA
    simulator's ``can_run()``) is true — and if not, why. Tests use the reason to skip."""
    name = canonical_backend(name)
    mod, why = _backend_module(name)
    if mod is None:
        return False, why
    if not callable(getattr(mod, "quantize_layer", None)):
        return False, f"{_MODULES[name]} does not define quantize_layer"
    if name == "numpy" or not hasattr(mod, "available") or _probe(mod, "available") or _probe(mod, "can_run"):
        return True, "available"
    reason = getattr(mod, "unavailable_reason", None)
    reason = reason() if callable(reason) else reason
    return False, f"{_MODULES[name]}.available() is False" + (f": {reason}" if reason else "")


def backend_available(name: str) -> bool:
    """True if the backend imports and says it can run here (``available()`` where defined);
    the CUDA simulator does not count (default_backend() never picks it)."""
    name = canonical_backend(name)
    if name == "numpy":
        return True
    mod, _ = _backend_module(name)
    return mod is not None and hasattr(mod, "quantize_layer") and (
        not hasattr(mod, "available") or _probe(mod, "available"))


def backend_runnable(name: str) -> bool:
    """True if the backend can execute here when asked for by name: available, or (cuda) the
    Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1), which default_backend() never picks."""
    return backend_status(name)[0]


def default_backend() -> str:
    """The fastest backend that can run here: cuda, then numba, then numpy."""
    for name in ("cuda", "numba"):
        if backend_available(name):
            return name
    return "numpy"


def get_solver(name: str | None = None) -> Solver:
    """quantize_layer of the named backend (None = default_backend(); aliases accepted)."""
    name = canonical_backend(name or default_backend())
    ok, why = backend_status(name)
    if not ok:
        hint = f"; install it with {_INSTALL_HINT[name]}" if name in _INSTALL_HINT else ""
        raise ValueError(f"backend: {name!r} is not available on this machine ({why}){hint}, "
                         "or pass --backend numpy")
    return importlib.import_module(_MODULES[name]).quantize_layer
