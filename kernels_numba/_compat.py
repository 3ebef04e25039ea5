"""Numba import guard: the package imports without numba and fails clearly at call time.

Every kernel module takes ``njit`` and ``prange`` from here. With numba installed they are
numba's; without it ``njit`` returns a stub that raises ImportError when called, so
``import kernels_numba`` always works and ``kernels_numba.available()`` can answer False.
"""

from __future__ import annotations

import functools

INSTALL_HINT = 'kernels_numba needs numba >= 0.60: pip install "decoupleq-ref[numba]" (or use the numpy backend, decoupleq_ref)'

try:  # pragma: no cover - exercised in both states by tests/numba/test_numba_backend.py
    import numba as _numba

    HAVE_NUMBA = tuple(int(x) for x in _numba.__version__.split(".")[:2]) >= (0, 60)
except ImportError:  # numba missing
    _numba = None
    HAVE_NUMBA = False


def available() -> bool:
    """True when numba (>= 0.60) is importable, i.e. the kernels can compile and run here."""
    return HAVE_NUMBA


def require() -> None:
    """Raise the ImportError that explains how to get numba (used by every public entry point)."""
    if not HAVE_NUMBA:
        raise ImportError(INSTALL_HINT)


if HAVE_NUMBA:
    prange = _numba.prange
    get_num_threads = _numba.get_num_threads

    def njit(*args, **kwargs):
        """numba.njit with cache=True by default (a second process loads instead of compiling)."""
        kwargs.setdefault("cache", True)
        return _numba.njit(*args, **kwargs)
else:
    prange = range

    def get_num_threads() -> int:
        return 1

    def njit(*args, **kwargs):
        def wrap(fn):
            @functools.wraps(fn)
            def stub(*a, **k):
                raise ImportError(INSTALL_HINT)
            return stub

        if args and callable(args[0]):
            return wrap(args[0])
        return wrap
